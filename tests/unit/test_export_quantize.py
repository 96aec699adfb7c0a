"""ONNX export, graph optimisation and int8 quantization on a tiny in-process BERT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeft.errors import DataError, ModelError

TEXTS = ["good movie", "the plot was very dull and the actor was poor", "not a great film", "superb scene",
         "a bad story", "the film is fine"]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    from edgeft.export import export_onnx

    # A private copy: the session-wide tiny model must not gain an edgeft.json other tests do not expect.
    model_dir = tmp_path_factory.mktemp("tiny-with-meta") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "edgeft.json").write_text(json.dumps({"max_length": 32, "label_names": ["c0", "c1"]}))
    out = tmp_path_factory.mktemp("onnx")
    return export_onnx(model_dir, out / "onnx", opset=17)


@pytest.fixture(scope="module")
def torch_ref(tiny_model_dir):
    from edgeft.modeling import load_classifier, load_tokenizer
    from edgeft.train import predict_logits

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_classifier(str(tiny_model_dir))
    return tok, predict_logits(model, tok, TEXTS, max_length=32, batch_size=4)


def _ort_logits(path, tok, batch_size=4):
    from edgeft.onnx_eval import make_session, onnx_logits

    return onnx_logits(make_session(path), tok, TEXTS, max_length=32, batch_size=batch_size)


def test_export_is_checked_dynamic_and_self_contained(exported, torch_ref):
    import onnx

    tok, ref = torch_ref
    folder = exported.parent
    for name in ("config.json", "edgeft.json", "vocab.txt", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert all(isinstance(d, str) for d in dims["input_ids"])  # batch and sequence are dynamic
    # different batch sizes (=> different padded lengths) give the torch logits
    for bs in (1, 4):
        np.testing.assert_allclose(_ort_logits(exported, tok, bs), ref, atol=1e-4)


def test_optimize_fuses_and_keeps_parity(exported, torch_ref, tmp_path):
    from edgeft.export import optimize_onnx

    tok, ref = torch_ref
    path, fused = optimize_onnx(exported, tmp_path / "fused", level=1, layernorm="fused")
    assert fused.get("Attention") == 2 and fused.get("SkipLayerNormalization", 0) == 4
    assert fused.get("EmbedLayerNormalization") == 1
    assert (tmp_path / "fused" / "edgeft.json").is_file()
    np.testing.assert_allclose(_ort_logits(path, tok), ref, atol=1e-4)
    # default: the four skip-layer-norms become InstanceNormalization over rows, same logits
    path, fused = optimize_onnx(exported, tmp_path / "opt", level=1)
    assert fused.get("LayerNormAsInstanceNorm") == 4 and "SkipLayerNormalization" not in fused
    assert fused.get("Attention") == 2
    np.testing.assert_allclose(_ort_logits(path, tok), ref, atol=1e-4)
    with pytest.raises(ModelError, match="layer-norm mode"):
        optimize_onnx(exported, tmp_path / "bad-ln", layernorm="rms")
    with pytest.raises(ModelError, match="optimizer level"):
        optimize_onnx(exported, tmp_path / "bad", level=5)


def _layernorm_graph(kind: str):
    """One (Skip)LayerNormalization on [batch, seq, 8] with gamma/beta (and bias, sum output for skip)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "s", 8])  # noqa: E731
    inits = [numpy_helper.from_array(rng.normal(size=8).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    if kind == "skip":
        node = helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                                ["y", "", "", "sum"], domain="com.microsoft", epsilon=1e-5, name="sln")
        inputs, outputs = [vi("x"), vi("skip")], [vi("y"), vi("sum")]
    else:
        node = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)
        inputs, outputs = [vi("x")], [vi("y")]
    graph = helper.make_graph([node], "ln", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("kind", ["skip", "plain"])
def test_layernorm_as_instance_norm_is_the_same_function(kind):
    import onnx
    import onnxruntime as ort

    from edgeft.export import layernorm_as_instance_norm

    model = _layernorm_graph(kind)
    rng = np.random.default_rng(1)
    feeds = {i.name: (rng.normal(size=(3, 5, 8)) * 4 + 1).astype(np.float32) for i in model.graph.input}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    before = run(model)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert layernorm_as_instance_norm(rewritten) == 1
    onnx.checker.check_model(rewritten)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "InstanceNormalization" in ops and not {"LayerNormalization", "SkipLayerNormalization"} & set(ops)
    after = run(rewritten)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_fusion_survives_head_pruning(tiny_model_dir, tmp_path):
    from edgeft.export import export_onnx, optimize_onnx
    from edgeft.modeling import load_classifier, load_tokenizer
    from edgeft.prune import PrunePlan, prune
    from edgeft.train import predict_logits

    model, tok = load_classifier(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prune(model, PrunePlan(heads={0: [0], 1: [1, 2]}, ffn_keep={0: list(range(32)), 1: list(range(32, 64))}))
    model.save_pretrained(tmp_path / "pruned")
    tok.save_pretrained(tmp_path / "pruned")
    onnx_path = export_onnx(tmp_path / "pruned", tmp_path / "onnx")
    opt, fused = optimize_onnx(onnx_path, tmp_path / "opt", level=2)
    assert fused.get("Attention") == 2  # uneven heads per layer still fuse
    ref = predict_logits(model, tok, TEXTS, max_length=32)
    np.testing.assert_allclose(_ort_logits(opt, tok), ref, atol=1e-4)


def test_quantize_dynamic_loads_and_agrees(exported, torch_ref, tmp_path):
    from edgeft.export import op_counts, optimize_onnx
    from edgeft.quantize import quantizable_nodes, quantize_dynamic

    tok, ref = torch_ref
    opt, _ = optimize_onnx(exported, tmp_path / "opt", level=1)
    q = quantize_dynamic(opt, tmp_path / "int8" / "model.onnx", per_channel=True)
    counts = op_counts(q)
    assert counts.get("QAttention") == 2 and counts.get("MatMulInteger", 0) >= 4
    logits = _ort_logits(q, tok)
    assert np.abs(logits - ref).max() < 0.05
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 5 / 6
    # excluded nodes stay float
    nodes = quantizable_nodes(opt)
    assert "Attention_0" in nodes or any(n.startswith("Attention") for n in nodes)
    matmuls = [n for n in nodes if "MatMul" in n]
    q2 = quantize_dynamic(opt, tmp_path / "int8b" / "model.onnx", exclude=matmuls[:1])
    assert op_counts(q2).get("MatMulInteger", 0) == counts["MatMulInteger"] - 1


def test_quantize_static_qdq(exported, torch_ref, tmp_path):
    from edgeft.export import op_counts
    from edgeft.quantize import calibration_feeds, quantize_static

    tok, ref = torch_ref
    feeds = calibration_feeds(exported, tok, TEXTS * 4, max_length=32)
    for method in ("minmax", "percentile"):
        q = quantize_static(exported, tmp_path / method / "model.onnx", feeds, method=method)
        assert op_counts(q).get("QuantizeLinear", 0) > 0
        logits = _ort_logits(q, tok)
        assert np.abs(logits - ref).max() < 0.1
    with pytest.raises(DataError, match="calibration set too small"):
        quantize_static(exported, tmp_path / "small" / "model.onnx", feeds[:3])


def test_corrupt_and_escaping_onnx_are_refused(exported, tmp_path):
    import onnx
    from onnx.external_data_helper import set_external_data

    from edgeft.export import optimize_onnx
    from edgeft.onnx_eval import make_session
    from edgeft.quantize import quantize_dynamic

    truncated = tmp_path / "trunc" / "model.onnx"
    truncated.parent.mkdir()
    truncated.write_bytes(exported.read_bytes()[: exported.stat().st_size // 3])
    for call in (lambda: make_session(truncated), lambda: optimize_onnx(truncated, tmp_path / "o"),
                 lambda: quantize_dynamic(truncated, tmp_path / "q" / "model.onnx")):
        with pytest.raises(ModelError, match="not a valid ONNX file|fails the ONNX checker|cannot load"):
            call()
    # external data pointing outside the model folder
    model = onnx.load(str(exported))
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "secret.bin").write_bytes(big.raw_data)
    set_external_data(big, location="../secret.bin", offset=0, length=len(big.raw_data))
    big.ClearField("raw_data")
    escaping = tmp_path / "esc" / "model.onnx"
    escaping.parent.mkdir()
    escaping.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="external data"):
        make_session(escaping)
    with pytest.raises(ModelError, match="external data"):
        quantize_dynamic(escaping, tmp_path / "q2" / "model.onnx")


def test_optimum_baseline_is_self_contained(tiny_model_dir, torch_ref, tmp_path):
    from edgeft.export import op_counts
    from edgeft.quantize import optimum_baseline

    tok, ref = torch_ref
    path = optimum_baseline(Path(tiny_model_dir), tmp_path / "optimum")
    assert path == tmp_path / "optimum" / "model.onnx"
    assert sorted(p.name for p in path.parent.glob("*.onnx")) == ["model.onnx"]
    assert (path.parent / "config.json").is_file() and (path.parent / "vocab.txt").is_file()
    assert op_counts(path).get("MatMulInteger", 0) > 0
    assert np.abs(_ort_logits(path, tok) - ref).max() < 0.1
    with pytest.raises(Exception, match="already exists"):
        optimum_baseline(Path(tiny_model_dir), tmp_path / "optimum")


def test_exclusion_steps():
    from edgeft.quantize import exclusion_steps

    assert exclusion_steps(0) == []
    assert exclusion_steps(1) == [1]
    assert exclusion_steps(8) == [1, 2, 4, 8]
    assert exclusion_steps(6) == [1, 2, 4, 6]


def test_torch_reference_is_deterministic(torch_ref, tiny_model_dir):
    """Two fresh loads and runs give bit-identical logits, whatever the batching."""
    from edgeft.modeling import load_classifier
    from edgeft.train import predict_logits

    tok, ref = torch_ref
    assert torch.isfinite(torch.as_tensor(ref)).all()
    for batch_size in (4, 4, 1):
        again = predict_logits(load_classifier(str(tiny_model_dir)), tok, TEXTS, max_length=32, batch_size=batch_size)
        if batch_size == 4:
            np.testing.assert_array_equal(again, ref)  # same batching: bit-identical
        else:
            np.testing.assert_allclose(again, ref, atol=1e-5)


def test_export_and_quantize_are_deterministic(tiny_model_dir, tmp_path):
    """Exporting and quantizing the same model twice gives byte-identical ONNX files."""
    from edgeft.export import export_onnx
    from edgeft.quantize import quantize_dynamic

    one = export_onnx(tiny_model_dir, tmp_path / "one", opset=17)
    two = export_onnx(tiny_model_dir, tmp_path / "two", opset=17)
    assert one.read_bytes() == two.read_bytes()
    q1 = quantize_dynamic(one, tmp_path / "q1" / "model.onnx")
    q2 = quantize_dynamic(two, tmp_path / "q2" / "model.onnx")
    assert q1.read_bytes() == q2.read_bytes()


# ---------------------------------------------------------------- issue 8: one of each, no dead code


def test_ort_model_type_uses_its_argument():
    from edgeft.export import ort_model_type

    assert ort_model_type("bert") == ort_model_type("roberta") == ort_model_type("distilbert") == "bert"
    assert ort_model_type("xlm-roberta") == "bert"
    assert ort_model_type("gpt2") == "gpt2" and ort_model_type("t5") == "t5"  # ORT's own fusions for these
    assert ort_model_type("some-new-type") == "bert"


def test_dead_code_is_gone():
    import edgeft.errors
    import edgeft.quantize

    assert not hasattr(edgeft.quantize, "_name_nodes") and not hasattr(edgeft.quantize, "onnx_size_mb")
    assert not hasattr(edgeft.errors, "Regression")


def test_usable_cores_is_written_once():
    root = Path(__file__).parents[2] / "edgeft"
    hits = [str(p.relative_to(root)) for p in root.rglob("*.py") if "sched_getaffinity" in p.read_text()]
    assert hits == ["hardware.py"]
    import edgeft.bench.core
    import edgeft.onnx_eval
    from edgeft.hardware import usable_cores

    assert edgeft.onnx_eval.usable_cores is usable_cores and edgeft.bench.core.usable_cores is usable_cores


def test_every_prediction_path_uses_the_one_batching(exported, torch_ref, tiny_model_dir, monkeypatch):
    """torch (edgeft.train), ONNX Runtime (edgeft.onnx_eval) and the bench engines batch through
    edgeft.evaluate.predict_batched, and agree."""
    import edgeft.evaluate
    from edgeft.bench.core import Variant, _predict
    from edgeft.bench.models import ModelSpec
    from edgeft.bench.runtimes import OrtEngine
    from edgeft.modeling import load_classifier
    from edgeft.train import predict_logits

    tok, ref = torch_ref
    calls = []
    real = edgeft.evaluate.predict_batched

    def spy(run_batch, *args, **kwargs):
        calls.append(kwargs.get("batch_size"))
        return real(run_batch, *args, **kwargs)

    monkeypatch.setattr(edgeft.evaluate, "predict_batched", spy)
    a = predict_logits(load_classifier(str(tiny_model_dir)), tok, TEXTS, max_length=32, batch_size=4)
    b = _ort_logits(exported, tok)
    v = Variant(ModelSpec("tiny", "onnx", exported, exported.parent), "ort-cpu", "fp32")
    v.engine, v.tokenizer = OrtEngine(exported, "ort-cpu", "fp32", threads=1), tok
    c = _predict(v, TEXTS, 32)
    assert len(calls) == 3
    np.testing.assert_array_equal(a, ref)
    np.testing.assert_allclose(b, ref, atol=1e-4)
    np.testing.assert_allclose(c, ref, atol=1e-4)


def test_memory_mb_is_10_to_the_6_bytes_everywhere(monkeypatch):
    """bench's memory figures used MiB while model sizes used 10^6 bytes; now all *_mb are 10^6 bytes."""
    import psutil

    import edgeft.bench.runtimes as rt

    monkeypatch.setattr(rt, "_cuda_available", lambda: (False, "no GPU (test)"))
    monkeypatch.setattr(rt, "_nvidia_smi", lambda q: ["1000, 2000, 550.1"] if "name" in q else ["1000"])
    assert rt.gpu_info()["memory_mb"] == round(2000 * 2**20 / 1e6)  # nvidia-smi says MiB
    assert rt.gpu_used_mb() == 1000 * 2**20 / 1e6
    with rt.PeakMemory() as pm:
        rss = psutil.Process().memory_info().rss
    assert pm.peak_rss_mb >= 0.9 * rss / 1e6 and abs(pm.rss_before_mb - rss / 1e6) < 0.2 * rss / 1e6
    assert pm.peak_rss_mb < 1.5 * rss / 1e6
