import os
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeft.errors import ModelError
from edgeft.safeio import check_hf_folder, check_onnx_external_data, check_safetensors, load_onnx_checked


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_good_folder_passes(tiny_model_dir):
    assert check_hf_folder(tiny_model_dir) == tiny_model_dir


def test_truncated_safetensors_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"model.safetensors is not a valid safetensors file \(truncated"):
        check_safetensors(w)
    with pytest.raises(ModelError, match="truncated or corrupt"):
        check_hf_folder(d)


@pytest.mark.parametrize("remove, message", [
    ("config.json", "has no config.json"),
    ("model.safetensors", "has no model weights"),
    ("tokenizer", "has no tokenizer"),
])
def test_incomplete_folders(tiny_model_dir, tmp_path, remove, message):
    d = _copy(tiny_model_dir, tmp_path / "m")
    for f in (["vocab.txt", "tokenizer.json"] if remove == "tokenizer" else [remove]):
        (d / f).unlink(missing_ok=True)
    with pytest.raises(ModelError, match=message):
        check_hf_folder(d)


def test_pickle_only_weights_refused(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle weights"):
        check_hf_folder(d)


def _external_model(folder, location):
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    if location != "weights.bin":
        m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(m, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_external_data_inside_folder_is_fine(tmp_path):
    path = _external_model(tmp_path / "ok", "weights.bin")
    check_onnx_external_data(path)
    load_onnx_checked(path)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "link.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    path = _external_model(tmp_path / "m", location)
    if location == "link.bin":
        (tmp_path / "m" / "link.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ModelError, match="refusing to load it"):
        check_onnx_external_data(path)


def test_corrupt_onnx(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelError, match="not a valid ONNX file"):
        check_onnx_external_data(p)


# ---------------------------------------------------------------- every tensor that can hold external data

def _ext(name, location, *, dims=(2,), dtype=TensorProto.FLOAT, offset=None, length=None, extra=()):
    t = TensorProto(name=name, data_type=dtype, dims=list(dims), data_location=TensorProto.EXTERNAL)
    for key, value in [("location", location), ("offset", offset), ("length", length), *extra]:
        if value is not None:
            e = t.external_data.add()
            e.key, e.value = key, str(value)
    return t


def _sparse(name, location, **kw):
    values = _ext(name, location, **kw)
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), name + "_indices")
    return onnx.SparseTensorProto(values=values, indices=indices, dims=[4, 4])


def _const_graph(attr):
    node = helper.make_node("Constant", [], ["y"], name="c")
    node.attribute.append(attr)
    return helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


def _carrier_model(carrier, location, **kw):
    """A model whose only external-data tensor (pointing at ``location``) sits in ``carrier``."""
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    functions = []
    if carrier == "sparse_initializer":
        graph = helper.make_graph([helper.make_node("Identity", ["S"], ["y"])], "g", [], [y])
        graph.sparse_initializer.append(_sparse("S", location, **kw))
    elif carrier == "sparse_indices":
        s = _sparse("S", "inside.bin")
        s.values.CopyFrom(numpy_helper.from_array(np.ones(2, np.float32), "S"))
        s.indices.CopyFrom(_ext("S_indices", location, dtype=TensorProto.INT64, **kw))
        graph = helper.make_graph([helper.make_node("Identity", ["S"], ["y"])], "g", [], [y])
        graph.sparse_initializer.append(s)
    elif carrier == "constant_sparse_value":
        graph = _const_graph(helper.make_attribute("sparse_value", _sparse("S", location, **kw)))
    elif carrier == "constant_value":
        graph = _const_graph(helper.make_attribute("value", _ext("C", location, **kw)))
    elif carrier in ("if_subgraph", "nested_subgraph"):
        def branch(init):
            return helper.make_graph([helper.make_node("Identity", ["T"], ["t_out"])], "b", [],
                                     [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)], init)
        inner = branch([_ext("T", location, **kw)])
        if carrier == "nested_subgraph":  # If inside If: the tensor is two subgraphs down
            inner_if = helper.make_node("If", ["cond"], ["t_out"], then_branch=inner,
                                        else_branch=branch([numpy_helper.from_array(np.ones(2, np.float32), "T")]))
            inner = helper.make_graph([inner_if], "mid", [],
                                      [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
        safe = branch([numpy_helper.from_array(np.ones(2, np.float32), "T")])
        node = helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=safe)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [y])
    elif carrier == "function_body":
        const = helper.make_node("Constant", [], ["fy"], value=_ext("F", location, **kw))
        functions = [helper.make_function("local", "f", [], ["fy"], [const], [helper.make_opsetid("", 17)])]
        graph = helper.make_graph([helper.make_node("f", [], ["y"], domain="local")], "g", [], [y])
    elif carrier == "initializer":
        graph = helper.make_graph([helper.make_node("Identity", ["W"], ["y"])], "g", [], [y], [_ext("W", location, **kw)])
    else:
        raise AssertionError(carrier)
    return helper.make_model(graph, functions=functions,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])


CARRIERS = ["sparse_initializer", "sparse_indices", "constant_sparse_value", "constant_value", "if_subgraph",
            "nested_subgraph", "function_body", "initializer"]


def _write(folder, model):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inside.bin").write_bytes(b"\0" * 64)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


@pytest.fixture()
def outside(tmp_path):
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"top secret bytes" * 4)
    return secret


def _point(folder, pointer, secret):
    """The location to write for ``pointer``, creating the link it needs inside ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if pointer == "absolute":
        return str(secret)
    if pointer == "dotdot":
        return "../outside/secret.bin"
    if pointer == "symlink":
        (folder / "weights.bin").symlink_to(secret)
        return "weights.bin"
    if pointer == "dir_symlink":
        (folder / "sub").symlink_to(secret.parent, target_is_directory=True)
        return "sub/secret.bin"
    if pointer == "hardlink":
        try:
            os.link(secret, folder / "weights.bin")
        except OSError as e:
            pytest.skip(f"no hard links here ({e})")
        return "weights.bin"
    raise AssertionError(pointer)


@pytest.mark.parametrize("pointer", ["absolute", "dotdot", "symlink", "dir_symlink", "hardlink"])
@pytest.mark.parametrize("carrier", CARRIERS)
def test_external_data_anywhere_pointing_outside_is_refused(tmp_path, outside, carrier, pointer):
    folder = tmp_path / "m"
    path = _write(folder, _carrier_model(carrier, _point(folder, pointer, outside)))
    with pytest.raises(ModelError, match="refusing to load it") as info:
        check_onnx_external_data(path)
    assert {"hardlink": "hard link", "absolute": "absolute", "dotdot": "'..'", "symlink": "symbolic link",
            "dir_symlink": "symbolic link"}[pointer] in str(info.value)


@pytest.mark.parametrize("carrier", CARRIERS)
def test_external_data_inside_the_folder_passes_for_every_carrier(tmp_path, carrier):
    check_onnx_external_data(_write(tmp_path / "m", _carrier_model(carrier, "inside.bin")))


@pytest.mark.parametrize("kw, needle", [
    ({"offset": -8}, "not a whole number"),
    ({"offset": "1e3"}, "not a whole number"),
    ({"length": -1}, "not a whole number"),
    ({"offset": 60, "length": 8}, "past the end of the file"),
    ({"length": 65}, "past the end of the file"),
    ({"offset": 1000}, "past the end of the file"),
    ({"offset": 60}, "past the end of the file"),  # no length: 2 float32 = 8 bytes from the dims
    ({"dims": (1000,)}, "past the end of the file"),
    ({"extra": [("location", "other.bin")]}, "twice"),
    ({"extra": [("__class__", "x")]}, "unknown key"),
])
@pytest.mark.parametrize("carrier", ["sparse_initializer", "constant_value"])
def test_bad_offsets_lengths_and_keys_are_refused(tmp_path, carrier, kw, needle):
    path = _write(tmp_path / "m", _carrier_model(carrier, "inside.bin", **kw))
    with pytest.raises(ModelError, match=needle):
        check_onnx_external_data(path)


@pytest.mark.parametrize("location", ["*/_ORT_MEM_ADDR_/*", "", "a\0b", ".", "missing.bin"])
def test_locations_that_are_not_files_are_refused(tmp_path, location):
    folder = tmp_path / "m"
    (folder / "*" / "_ORT_MEM_ADDR_").mkdir(parents=True)
    (folder / "*" / "_ORT_MEM_ADDR_" / "*").write_bytes(b"\0" * 64)  # even if such a file exists
    path = _write(folder, _carrier_model("sparse_initializer", location))
    with pytest.raises(ModelError, match="refusing to load it"):
        check_onnx_external_data(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "pipe.bin")
    with pytest.raises(ModelError, match="not a regular file"):
        check_onnx_external_data(_write(folder, _carrier_model("constant_value", "pipe.bin")))


def test_external_flag_without_external_entries_and_vice_versa(tmp_path):
    model = _carrier_model("constant_value", "inside.bin")
    model.graph.node[0].attribute[0].t.data_location = TensorProto.DEFAULT  # entries, not marked external
    with pytest.raises(ModelError, match="not marked external"):
        check_onnx_external_data(_write(tmp_path / "m", model))


def test_deeply_nested_subgraphs_are_walked(tmp_path):
    """A tensor 20 subgraphs down (protobuf itself refuses much deeper messages) is found and refused."""
    from edgeft.safeio import onnx_tensors

    graph = helper.make_graph([], "leaf", [], [], [_ext("T", "../outside/secret.bin")])
    for _ in range(20):
        node = helper.make_node("Loop", ["n", "c"], ["o"], body=graph)
        graph = helper.make_graph([node], "g", [], [])
    model = helper.make_model(graph)
    assert [t.name for _, t in onnx_tensors(model)] == ["T"]
    with pytest.raises(ModelError, match="in the subgraph of attribute 'body'"):
        check_onnx_external_data(_write(tmp_path / "m", model))


def test_constant_reading_an_outside_file_never_reaches_onnx_runtime(tmp_path, outside):
    """The probe's repro: a Constant whose external data is a hard link to an outside file. Before the
    fix ONNX Runtime returned the outside file's bytes as the model's output."""
    from edgeft.onnx_eval import make_session

    folder = tmp_path / "m"
    model = _carrier_model("constant_sparse_value", _point(folder, "hardlink", outside), length=8)
    path = _write(folder, model)
    with pytest.raises(ModelError, match="hard link"):
        make_session(path)
    with pytest.raises(ModelError, match="hard link"):
        load_onnx_checked(path)


def test_bench_of_a_folder_with_a_hard_linked_sparse_initializer_exits_2(tmp_path, outside, tiny_csv):
    from click.testing import CliRunner

    from edgeft.cli import cli

    folder = tmp_path / "m"
    path = _write(folder, _carrier_model("sparse_initializer", _point(folder, "hardlink", outside)))
    r = CliRunner().invoke(cli, ["bench", str(path), "--data", f"{tiny_csv}:test", "--out", str(tmp_path / "o")],
                           catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert "hard link" in r.output and "refusing to load it" in r.output and "Traceback" not in r.output


def test_edgeft_outputs_are_not_hard_links(tmp_path, tiny_model_dir):
    """The hard-link rule must never refuse edgeft's own files: export and int8 write plain single-name files."""
    from edgeft.export import export_onnx
    from edgeft.quantize import quantize_dynamic

    target = export_onnx(tiny_model_dir, tmp_path / "onnx")
    int8 = quantize_dynamic(target, tmp_path / "int8" / "model.onnx")
    for p in [*target.parent.rglob("*"), *int8.parent.rglob("*")]:
        if p.is_file():
            assert os.stat(p).st_nlink == 1, p
    check_onnx_external_data(target)
    check_onnx_external_data(int8)


def test_ship_inlines_attribute_external_data_and_refuses_sparse(tmp_path):
    """ship's copy looked at initializers only: a Constant's external data was left behind (a broken
    bundle) and sparse external data cannot be inlined by onnx at all."""
    from edgeft.errors import EdgeftError
    from edgeft.ship import _copy_onnx

    src = _write(tmp_path / "m", _carrier_model("constant_value", "inside.bin", length=8))
    dst = tmp_path / "bundle" / "model.onnx"
    dst.parent.mkdir()
    _copy_onnx(src, dst)
    copied = onnx.load(str(dst), load_external_data=False)
    assert copied.graph.node[0].attribute[0].t.data_location == TensorProto.DEFAULT
    assert not (dst.parent / "inside.bin").exists()

    sparse = _write(tmp_path / "s", _carrier_model("sparse_initializer", "inside.bin", length=8))
    with pytest.raises(EdgeftError, match="sparse tensors in external data"):
        _copy_onnx(sparse, tmp_path / "bundle" / "sparse.onnx")


def test_ep_context_nodes_are_refused(tmp_path):
    """An EPContext node names a cache file ONNX Runtime opens itself (outside any external-data check)."""
    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", name="ctx",
                            ep_cache_context="../outside/secret.bin", embed_mode=0)
    inner = helper.make_graph([node], "b", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    outer = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([outer], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(ModelError, match="EPContext node"):
        check_onnx_external_data(_write(tmp_path / "m", helper.make_model(graph)))


def test_onnx_nodes_walks_subgraphs_and_functions():
    from edgeft.safeio import onnx_nodes

    model = _carrier_model("nested_subgraph", "inside.bin")
    assert sorted(n.op_type for n in onnx_nodes(model)) == ["Identity", "Identity", "Identity", "If", "If"]
    model = _carrier_model("function_body", "inside.bin")
    assert sorted(n.op_type for n in onnx_nodes(model)) == ["Constant", "f"]


# What ONNX Runtime / onnx / optimum may read external data through, and the calls that check first.
_LOADER = re.compile(r"InferenceSession\(|onnx\.load\((?!.*load_external_data=False)|checker\.check_model\(|"
                     r"ORTModelFor\w+\.from_pretrained|ORTQuantizer\.from_pretrained|optimize_model\(|"
                     r"ort_quantize_(dynamic|static)\(")
_GUARD = re.compile(r"check_onnx_external_data\(|load_onnx_checked\(|make_session\(")
# (file, function): loads that read no file of the user's
_NOT_USER_FILES = {
    ("edgeft/bundle_checks.py", "_reference_session"),  # a session from an in-memory model edgeft builds
    ("edgeft/quantize.py", "optimum_baseline"),  # optimum's quantizer on the model export_onnx just wrote and checked
}


def test_every_onnx_loader_in_edgeft_checks_external_data_first():
    """A static guard: any function that hands an ONNX file to a loader calls the check before it."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    unguarded = []
    for p in sorted([*(repo / "edgeft").rglob("*.py"), *(repo / "bench").rglob("*.py")]):
        src = p.read_text()
        rel = p.relative_to(repo).as_posix()
        for fn in ast.walk(ast.parse(src)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or (rel, fn.name) in _NOT_USER_FILES:
                continue
            body = ast.get_source_segment(src, fn)
            for m in _LOADER.finditer(body):
                if not _GUARD.search(body[:m.start()]):
                    unguarded.append(f"{rel}:{fn.name}: {m.group(0)}")
    assert not unguarded, unguarded
