"""`edgeft ship --triton` (edgeft/scale/triton.py) on a tiny real bundle (tiny BERT exported to ONNX, built once
per module in seconds): the generated repository parses into Triton's ModelConfig protobuf and passes the
offline check; broken variants are reported naming the file; an emulation runs the repository's own
tokenizer and postprocess model.py files (with a Triton Python-backend test double) and its ONNX model,
chained as the parsed ensemble config wires them, and matches edgeft's ModelRunner. A last test runs a
real tritonserver when one is installed (nvidia-pytriton's, or EDGEFT_TRITONSERVER_HOME) and skips otherwise."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import EdgeftError

LABELS = ["neg", "neu", "pos"]
MAX_LENGTH = 16
SERVING = {"max_batch_size": 8, "max_batch_tokens": 16384, "max_queue_delay_ms": 2.5, "queue_capacity": 64,
           "threads": 1, "latency_budget_ms": 50.0}
TEXTS = ["good", "the movie was very good and the plot is superb", "", "bad bad bad",
         " ".join(["awful"] * 40),  # longer than max_length tokens: truncated
         "héllo wörld, a scene!", "x" * 5000]  # past max_chars (4096): cut before tokenizing, as edgeft serve does


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seal(bundle: Path, manifest: dict) -> None:
    """manifest.json (with every file) and SHA256SUMS, as ship() writes them after the parts."""
    from edgeft.bundle import bundle_files, sums_text

    manifest["files"] = {rel: {"sha256": _sha(bundle / rel), "bytes": (bundle / rel).stat().st_size}
                         for rel in bundle_files(bundle) if rel != "manifest.json"}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (bundle / "SHA256SUMS").write_text(sums_text(bundle))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """make_bundle's tiny bundle + the manifest sections model_part/serving_part write, then triton_part for real."""
    from serve_helpers import make_bundle

    from edgeft.scale.triton import triton_part
    from edgeft.ship import ShipContext, _onnx_io

    root = make_bundle(tmp_path_factory.mktemp("triton") / "tiny", max_length=MAX_LENGTH, serving=dict(SERVING))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["io"] = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                      "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(LABELS)]},
                                  {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                      "onnx": _onnx_io(root / "model" / "model.onnx")}
    ctx = ShipContext(cfg=None, run_dir=root, stage=root, name="tiny", version="1", variant=None, report={},
                      bench=None, recipe=None, manifest=manifest)
    triton_part(ctx)
    _seal(root, manifest)
    return root


@pytest.fixture()
def copy(bundle, tmp_path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "b"))


def _configs(repo: Path) -> dict:
    from google.protobuf import text_format

    from edgeft.scale.triton import model_config_pb2

    pb = model_config_pb2()
    out = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        out[path.parent.name] = text_format.Parse(path.read_text(), pb.ModelConfig())
    return out


# ---------------------------------------------------------------- the generated repository


def test_layout_manifest_and_policy(bundle):
    from edgeft.bundle import check_checksums

    files = {p.relative_to(bundle).as_posix() for p in (bundle / "triton").rglob("*") if p.is_file()}
    assert files == {"triton/README.md", "triton/tiny/config.pbtxt", "triton/tiny/1/README.txt",
                     "triton/tiny_tokenizer/config.pbtxt", "triton/tiny_tokenizer/1/model.py",
                     "triton/tiny_tokenizer/1/tokenizer.json", "triton/tiny_onnx/config.pbtxt",
                     "triton/tiny_onnx/1/model.onnx", "triton/tiny_postprocess/config.pbtxt",
                     "triton/tiny_postprocess/1/model.py", "triton/tiny_postprocess/1/labels.txt"}
    m = json.loads((bundle / "manifest.json").read_text())
    assert files <= set(m["files"]) and check_checksums(bundle) == []  # the bundle's checksums cover them
    t = m["triton"]
    assert t["repository"] == "triton" and t["ensemble"] == "tiny" and t["version"] == 1
    assert [x["name"] for x in t["models"]] == ["tiny", "tiny_tokenizer", "tiny_onnx", "tiny_postprocess"]
    assert t["tritonserver_run"] is False and t["validated"]["problems"] == 0
    assert t["validated"]["schema"] == "inference.ModelConfig"
    assert (bundle / "triton/tiny_onnx/1/model.onnx").read_bytes() == (bundle / "model/model.onnx").read_bytes()

    c = _configs(bundle / "triton")
    ens, tok, onnx, post = c["tiny"], c["tiny_tokenizer"], c["tiny_onnx"], c["tiny_postprocess"]
    assert ens.platform == "ensemble" and ens.max_batch_size == 0 and not ens.instance_group
    assert [(i.name, list(i.dims)) for i in ens.input] == [("text", [-1])]
    assert [(o.name, list(o.dims)) for o in ens.output] == [("logits", [-1, 3]), ("label", [-1])]
    assert tok.backend == post.backend == "python" and tok.max_batch_size == post.max_batch_size == 0
    assert tok.parameters["max_length"].string_value == str(MAX_LENGTH)
    # the serve defaults: a request is never split by Triton, so max_batch_size holds max_items (256) texts;
    # edgeft's max_batch_size is the preferred batch
    assert onnx.backend == "onnxruntime" and onnx.max_batch_size == 256
    assert [(i.name, list(i.dims)) for i in onnx.input] == [("input_ids", [-1]), ("attention_mask", [-1]),
                                                            ("token_type_ids", [-1])]
    assert [(o.name, list(o.dims)) for o in onnx.output] == [("logits", [3])]  # batch dimension excluded
    db = onnx.dynamic_batching
    assert list(db.preferred_batch_size) == [8] and db.max_queue_delay_microseconds == 2500
    assert db.default_queue_policy.max_queue_size == 64
    assert db.default_queue_policy.default_timeout_microseconds == 10_000_000  # ServeConfig's request_timeout_s
    assert db.default_queue_policy.timeout_action == 0  # REJECT
    assert [(g.kind, g.count) for g in onnx.instance_group] == [(2, 1)]  # KIND_CPU
    assert onnx.parameters["intra_op_thread_count"].string_value == "1"
    assert onnx.parameters["inter_op_thread_count"].string_value == "1"
    assert t["policy"]["max_batch_size"] == 256 and t["policy"]["max_queue_size"] == 64


def test_generated_repository_is_valid(bundle):
    from edgeft.scale.triton import check_triton

    assert check_triton(bundle) == []


def test_configs_are_regenerated_byte_for_byte(bundle):
    """Same inputs, same config.pbtxt text (map entries sorted, no timestamps): a re-ship changes no checksum."""
    from edgeft.scale.triton import build_configs, config_text, model_names, serving_policy

    m = json.loads((bundle / "manifest.json").read_text())
    pad = int(_configs(bundle / "triton")["tiny_tokenizer"].parameters["pad_id"].string_value)
    configs = build_configs("tiny", 1, LABELS, m["io"]["onnx"], MAX_LENGTH, pad, serving_policy(m["serving"]))
    for role, name in model_names("tiny").items():
        assert (bundle / "triton" / name / "config.pbtxt").read_text() == config_text(configs[role])


def test_schema_loads_without_grpcio(bundle):
    """tritonclient.grpc imports grpcio; the schema module itself needs only protobuf."""
    code = ("import sys; sys.modules['grpc'] = None\n"
            "from edgeft.scale.triton import check_triton, model_config_pb2\n"
            "assert model_config_pb2().__name__ == 'edgeft_triton_model_config_pb2'\n"
            f"print(check_triton({str(bundle)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_repository_is_one_problem(copy):
    from edgeft.scale.triton import check_triton

    shutil.rmtree(copy / "triton")
    assert check_triton(copy) == ["the bundle has no Triton model repository: re-ship it with `edgeft ship --triton`"]


@pytest.mark.parametrize("version, expected", [("1", 1), ("7", 7), ("2024", 2024)])
def test_version_mapping(version, expected):
    from edgeft.scale.triton import triton_version

    assert triton_version(version) == expected


@pytest.mark.parametrize("version", ["0", "01", "1.0", "v1", "2024-01", ""])
def test_versions_triton_cannot_express_are_refused(version):
    from edgeft.scale.triton import triton_version

    with pytest.raises(EdgeftError) as e:
        triton_version(version)
    assert "--version" in e.value.one_line() and "\n" not in e.value.one_line()


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert text.count(old) >= count, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def _onnx_input_name(b):
    _edit(b / "triton/tiny_onnx/config.pbtxt", 'name: "input_ids"', 'name: "input_idz"')


def _onnx_output_dims(b):
    _edit(b / "triton/tiny_onnx/config.pbtxt", "dims: 3", "dims: 4")


def _tokenizer_output_dims(b):
    # (dims [-1] alone would pass: Triton compares [-1] with the ONNX model's [-1] before expanding the batch dim)
    _edit(b / "triton/tiny_tokenizer/config.pbtxt", '  name: "input_ids"\n  data_type: TYPE_INT64\n  dims: -1\n  dims: -1',
          '  name: "input_ids"\n  data_type: TYPE_INT64\n  dims: -1\n  dims: -1\n  dims: 2')


def _postprocess_dims(b):
    _edit(b / "triton/tiny_postprocess/config.pbtxt", "dims: 3", "dims: 4")


def _onnx_dtype(b):
    _edit(b / "triton/tiny_onnx/config.pbtxt", '"attention_mask"\n  data_type: TYPE_INT64', '"attention_mask"\n  data_type: TYPE_INT32')


def _missing_version(b):
    shutil.rmtree(b / "triton/tiny_onnx/1")


def _bad_syntax(b):
    _edit(b / "triton/tiny_postprocess/config.pbtxt", "max_batch_size", "max_batch_size {{")


def _missing_tensor(b):
    _edit(b / "triton/tiny/config.pbtxt", 'key: "LOGITS"\n      value: "logits"', 'key: "LOGITS"\n      value: "logitz"')


def _missing_input(b):
    _edit(b / "triton/tiny/config.pbtxt", 'key: "LOGITS"', 'key: "LOGITZ"')


def _name_mismatch(b):
    _edit(b / "triton/tiny_tokenizer/config.pbtxt", 'name: "tiny_tokenizer"', 'name: "tokenizer"')


def _labels(b):
    (b / "triton/tiny_postprocess/1/labels.txt").write_text("neg\npos\nneu\n")


def _no_model_py(b):
    (b / "triton/tiny_tokenizer/1/model.py").unlink()


def _gpu(b):
    _edit(b / "triton/tiny_onnx/config.pbtxt", "kind: KIND_CPU", "kind: KIND_GPU")


def _damaged_onnx(b):
    (b / "triton/tiny_onnx/1/model.onnx").write_bytes(b"\x08\x07garbage")


def _max_length(b):
    _edit(b / "triton/tiny_tokenizer/config.pbtxt", f'string_value: "{MAX_LENGTH}"', 'string_value: "512"')


def _ensemble_api(b):
    _edit(b / "triton/tiny/config.pbtxt", 'name: "text"', 'name: "TEXT"')


@pytest.mark.parametrize("mutate, file, words", [
    (_onnx_input_name, "triton/tiny_onnx/config.pbtxt", "input_idz"),
    (_onnx_output_dims, "triton/tiny_onnx/config.pbtxt", "dims"),
    (_tokenizer_output_dims, "triton/tiny/config.pbtxt", "shape"),
    (_postprocess_dims, "triton/tiny/config.pbtxt", "shape"),
    (_onnx_dtype, "triton/tiny_onnx/config.pbtxt", "TYPE_INT32"),
    (_missing_version, "triton/tiny_onnx", "version"),
    (_bad_syntax, "triton/tiny_postprocess/config.pbtxt", "not a valid Triton model config"),
    (_missing_tensor, "triton/tiny/config.pbtxt", "logitz"),
    (_missing_input, "triton/tiny/config.pbtxt", "LOGITZ"),
    (_name_mismatch, "triton/tiny_tokenizer/config.pbtxt", "folder"),
    (_labels, "triton/tiny_postprocess/1/labels.txt", "labels"),
    (_no_model_py, "triton/tiny_tokenizer/1", "model.py"),
    (_gpu, "triton/tiny_onnx/config.pbtxt", "KIND_GPU"),
    (_damaged_onnx, "triton/tiny_onnx/1/model.onnx", "onnx cannot read"),
    (_max_length, "triton/tiny_tokenizer/config.pbtxt", "max_length"),
    (_ensemble_api, "triton/tiny/config.pbtxt", "edgeft serve"),
])
def test_broken_variants_are_reported_naming_the_file(copy, mutate, file, words):
    from edgeft.scale.triton import check_triton

    mutate(copy)
    problems = check_triton(copy)
    assert problems, f"{mutate.__name__}: no problem reported"
    assert all("\n" not in p for p in problems)
    assert any(p.startswith(file) and words in p for p in problems), problems


# ---------------------------------------------------------------- emulation: the repository computes the right thing

NP = {"TYPE_STRING": np.object_, "TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32}


def _load_python_model(path: Path, config, monkeypatch):
    """model.py as the Python backend runs it: imported with triton_python_backend_utils, then initialize()."""
    import triton_shim
    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", triton_shim)
    spec = importlib.util.spec_from_file_location(f"triton_model_{path.parent.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                      "model_instance_kind": "CPU", "model_instance_device_id": "0",
                      "model_repository": str(path.parent.parent), "model_version": path.parent.name,
                      "model_name": config.name})
    return model


def _check_shape(pb, config, io, array: np.ndarray, where: str) -> None:
    """What Triton checks on the tensors passed between steps: data type, rank and fixed dims (batch dim
    included when max_batch_size > 0, and within max_batch_size)."""
    dims = list(io.dims)
    if config.max_batch_size > 0:
        assert 1 <= array.shape[0] <= config.max_batch_size, f"{where}: batch {array.shape[0]}"
        dims = [-1] + dims
    assert array.dtype == NP[pb.DataType.Name(io.data_type)], f"{where}: dtype {array.dtype}"
    assert len(array.shape) == len(dims) and all(d in (-1, s) for d, s in zip(dims, array.shape)), \
        f"{where}: shape {array.shape} vs dims {dims}"


class Emulator:
    """The ensemble executed the way its config says: each step's input_map/output_map on a tensor table."""

    def __init__(self, repo: Path, monkeypatch):
        import onnxruntime as ort

        from edgeft.scale.triton import model_config_pb2

        self.pb, self.repo = model_config_pb2(), repo
        self.configs = _configs(repo)
        self.runners = {}
        for name, c in self.configs.items():
            if c.platform == "ensemble":
                continue
            vdir = repo / name / str(max(int(p.name) for p in (repo / name).iterdir() if p.is_dir()))
            if c.backend == "python":
                self.runners[name] = _load_python_model(vdir / (c.default_model_filename or "model.py"), c, monkeypatch)
            else:
                assert c.backend == "onnxruntime"
                so = ort.SessionOptions()
                so.intra_op_num_threads = int(c.parameters["intra_op_thread_count"].string_value) or 1
                so.inter_op_num_threads = int(c.parameters["inter_op_thread_count"].string_value) or 1
                self.runners[name] = ort.InferenceSession(str(vdir / (c.default_model_filename or "model.onnx")), so,
                                                          providers=["CPUExecutionProvider"])

    def _step(self, config, inputs: dict[str, np.ndarray]):
        import triton_shim

        runner = self.runners[config.name]
        if config.backend == "python":
            request = triton_shim.InferenceRequest([triton_shim.Tensor(k, v) for k, v in inputs.items()])
            (response,) = runner.execute([request])
            if response.has_error():
                raise triton_shim.TritonError(response.error().message())
            return {t.name(): t.as_numpy() for t in response.output_tensors()}
        names = [o.name for o in config.output]
        return dict(zip(names, runner.run(names, inputs)))

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ens = self.configs[model]
        for io in ens.input:
            _check_shape(self.pb, ens, io, inputs[io.name], f"{model} input {io.name}")
        tensors = dict(inputs)
        for step in ens.ensemble_scheduling.step:
            c = self.configs[step.model_name]
            feeds = {key: tensors[value] for key, value in step.input_map.items()}
            for io in c.input:
                _check_shape(self.pb, c, io, feeds[io.name], f"{c.name} input {io.name}")
            outs = self._step(c, feeds)
            for io in c.output:
                _check_shape(self.pb, c, io, outs[io.name], f"{c.name} output {io.name}")
            for key, value in step.output_map.items():
                tensors[value] = outs[key]
        out = {io.name: tensors[io.name] for io in ens.output}
        for io in ens.output:
            _check_shape(self.pb, ens, io, out[io.name], f"{model} output {io.name}")
        return out


@pytest.fixture(scope="module")
def reference(bundle):
    from edgeft.serve.runner import ModelRunner

    return ModelRunner(bundle / "model", bundle / "model" / "model.onnx", max_length=MAX_LENGTH, threads=1)


def _texts(texts: list[str]) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts], dtype=np.object_)


def test_emulated_ensemble_matches_edgeft_serve(bundle, reference, monkeypatch):
    """The repository's own model.py files and model.onnx, wired as the parsed ensemble config says, give the
    logits and labels of edgeft's ModelRunner (the `edgeft serve` path) for a batch of texts of different
    lengths, an empty text, texts past max_length tokens and past max_chars characters; and one by one."""
    emu = Emulator(bundle / "triton", monkeypatch)
    steps = [s.model_name for s in emu.configs["tiny"].ensemble_scheduling.step]
    assert steps == ["tiny_tokenizer", "tiny_onnx", "tiny_postprocess"]

    out = emu.infer("tiny", {"text": _texts(TEXTS)})
    cut = [t[:4096] for t in TEXTS]  # edgeft serve cuts texts to max_chars before the runner sees them
    want, _ = reference.predict(cut)
    assert out["logits"].shape == (len(TEXTS), len(LABELS)) and out["logits"].dtype == np.float32
    np.testing.assert_allclose(out["logits"], want, rtol=0, atol=1e-5)
    assert [x.decode() for x in out["label"]] == [LABELS[j] for j in want.argmax(-1)]
    assert reference.encode([TEXTS[4]])[0].tokens == MAX_LENGTH  # the long text really was truncated
    for text in TEXTS[:3]:
        one = emu.infer("tiny", {"text": _texts([text])})
        np.testing.assert_allclose(one["logits"], reference.predict([text[:4096]])[0], rtol=0, atol=1e-5)


def test_emulated_tokenizer_pads_like_the_runner(bundle, reference, monkeypatch):
    emu = Emulator(bundle / "triton", monkeypatch)
    c = emu.configs["tiny_tokenizer"]
    outs = emu._step(c, {"TEXT": _texts(TEXTS[:4])})
    encs = reference.encode(TEXTS[:4])
    width = max(e.tokens for e in encs)
    assert outs["input_ids"].shape == (4, width)
    for i, e in enumerate(encs):
        assert outs["input_ids"][i, :e.tokens].tolist() == e.ids
        assert set(outs["input_ids"][i, e.tokens:].tolist()) <= {reference.pad_id}
        assert outs["attention_mask"][i].sum() == e.tokens


def test_emulated_tokenizer_rejects_bad_text(bundle, monkeypatch):
    import triton_shim

    emu = Emulator(bundle / "triton", monkeypatch)
    with pytest.raises(triton_shim.TritonError, match="not UTF-8"):
        emu.infer("tiny", {"text": np.array([b"ok", b"\xff\xfe"], dtype=np.object_)})


# ---------------------------------------------------------------- a real tritonserver, when one is installed

STANDIN = '''\
"""Test stand-in for the onnxruntime backend (absent from nvidia-pytriton's tritonserver): the same
config.pbtxt I/O and batching, onnxruntime on the repository's model.onnx."""
import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(__file__).resolve().parent / "model.onnx"), so,
                                            providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            outs = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, o) for n, o in zip(self.outputs, outs)]))
        return responses
'''


def _tritonserver(tmp_path: Path) -> tuple[Path, dict[str, str]] | str:
    """(tritonserver home with bin/ and backends/, environment), or why not. EDGEFT_TRITONSERVER_HOME (plus
    EDGEFT_TRITONSERVER_LIBS for LD_LIBRARY_PATH) wins; else nvidia-pytriton's bundled server, prepared as
    pytriton does (a copy with this Python's backend stub). EDGEFT_TRITON_PYTHON names the Python whose
    packages the backend stub uses (default: this one)."""
    env = dict(os.environ)
    home = os.environ.get("EDGEFT_TRITONSERVER_HOME")
    libs = os.environ.get("EDGEFT_TRITONSERVER_LIBS")
    python = os.environ.get("EDGEFT_TRITON_PYTHON", sys.executable)
    if home:
        home_path = Path(home)
    else:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            return "no tritonserver here (pip install nvidia-pytriton, or set EDGEFT_TRITONSERVER_HOME)"
        numpy = subprocess.run([python, "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                               text=True).stdout.strip()
        if not numpy.split(".")[0].isdigit() or int(numpy.split(".")[0]) >= 2:
            # pytriton pins numpy<2: its 2.51 stub mis-reads BYTES tensors under numpy 2 (the stub crashes)
            return (f"pytriton's Python backend stub needs numpy<2 (found {numpy or 'none'} for {python}): set "
                    "EDGEFT_TRITON_PYTHON to a Python with numpy<2, tokenizers and onnxruntime")
        pkg = Path(list(spec.submodule_search_locations)[0])
        stub = pkg / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
            "triton_python_backend_stub"
        if not stub.is_file():
            return f"pytriton has no Python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}"
        home_path = Path(shutil.copytree(pkg / "tritonserver", tmp_path / "tritonserver",
                                         ignore=shutil.ignore_patterns("python_backend_stubs")))
        shutil.copy(stub, home_path / "backends" / "python" / "triton_python_backend_stub")
        for exe in (home_path / "bin" / "tritonserver", home_path / "backends" / "python" / "triton_python_backend_stub"):
            exe.chmod(0o755)  # an unzipped (not pip-installed) wheel loses the exec bits
        libs = libs or str(pkg.parent / "nvidia_pytriton.libs")
    if not (home_path / "bin" / "tritonserver").is_file():
        return f"no {home_path}/bin/tritonserver"
    if libs:
        env["LD_LIBRARY_PATH"] = libs + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    # The Python backend stub embeds libpython in isolated mode (PYTHONPATH is ignored); it finds this
    # virtualenv's packages (numpy, tokenizers, onnxruntime) through the `python` first on PATH.
    env["PATH"] = str(Path(python).parent) + os.pathsep + env.get("PATH", "")
    return home_path, env


def test_real_tritonserver_serves_the_same_answers(bundle, reference, tmp_path):
    import httpx
    from serve_helpers import free_port

    found = _tritonserver(tmp_path)
    if isinstance(found, str):
        pytest.skip(found)
    home, env = found
    repo = Path(shutil.copytree(bundle / "triton", tmp_path / "repo"))
    standin = not (home / "backends" / "onnxruntime").is_dir()
    if standin:  # same config but the python backend: the ensemble, tokenizer and postprocess still run for real
        _edit(repo / "tiny_onnx/config.pbtxt", 'backend: "onnxruntime"', 'backend: "python"')
        _edit(repo / "tiny_onnx/config.pbtxt", 'default_model_filename: "model.onnx"\n', "")
        (repo / "tiny_onnx/1/model.py").write_text(STANDIN)
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(tmp_path / "tritonserver.log", "wb")
    proc = subprocess.Popen([str(home / "bin" / "tritonserver"), f"--model-repository={repo}",
                             f"--backend-directory={home / 'backends'}", f"--http-port={http}",
                             f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--exit-on-error=true"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        t_end = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited {proc.returncode}: "
                            f"{(tmp_path / 'tritonserver.log').read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < t_end, (tmp_path / "tritonserver.log").read_text(errors="replace")[-3000:]
            time.sleep(0.25)
        with httpx.Client(base_url=url, timeout=30) as client:
            meta = client.get("/v2/models/tiny/versions/1").json()
            assert meta["name"] == "tiny" and meta["versions"] == ["1"]
            assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
            assert sorted(meta["outputs"], key=lambda o: o["name"]) == [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, len(LABELS)]}]
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
            res = client.post("/v2/models/tiny/versions/1/infer", json=body)
            assert res.status_code == 200, res.text
            outputs = {o["name"]: o for o in res.json()["outputs"]}
            want, _ = reference.predict([t[:4096] for t in TEXTS])
            assert outputs["logits"]["shape"] == [len(TEXTS), len(LABELS)]
            np.testing.assert_allclose(np.array(outputs["logits"]["data"]).reshape(want.shape), want, atol=1e-4)
            assert outputs["label"]["data"] == [LABELS[j] for j in want.argmax(-1)]
            bad = client.post("/v2/models/tiny/infer", json={"inputs": [{"name": "text", "datatype": "BYTES",
                                                                         "shape": [1, 1], "data": [["x"]]}]})
            assert bad.status_code == 400  # Triton takes text [N] only (edgeft serve also takes [N, 1])
        print(f"tritonserver at {home}: ensemble + python tokenizer/postprocess ran for real; ONNX step "
              f"{'python stand-in (no onnxruntime backend)' if standin else 'onnxruntime backend'}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
