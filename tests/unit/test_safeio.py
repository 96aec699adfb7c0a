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
