"""End to end on tiny in-process models: a run folder (finetuned + pruned torch, ONNX fp32 + int8), then
the report's schema, the markdown and the plot, the CLI, and the gate on two reports."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_tiny_classifier
from edgeft.artifacts import RUN_MARKER
from edgeft.recipe import BenchConfig

# One thread: the machines are shared, and OpenMP with two threads on two busy cores stalls for milliseconds.
FAST = dict(min_samples=20, max_seconds_per_variant=0.3, batch_sizes=[1], seq_lengths=[16], threads=1)


def export_tiny_onnx(hf_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(1, 8, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out / "model.onnx"),
                          input_names=names, output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={**{k: {0: "b", 1: "s"} for k in names}, "logits": {0: "b"}})
    return out / "model.onnx"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """RUN/finetuned (HF), RUN/compress/{pruned (HF), onnx/model.onnx, int8/model.onnx} + report.json.
    The ONNX folders hold no tokenizer: bench falls back to RUN/finetuned's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    run = tmp_path_factory.mktemp("bench") / "run"
    ft = make_tiny_classifier(run / "finetuned")
    (ft / "edgeft.json").write_text(json.dumps({"max_length": 32, "label_names": ["neg", "pos"]}))
    comp = run / "compress"
    make_tiny_classifier(comp / "pruned", intermediate=32, seed=1)
    fp32 = export_tiny_onnx(ft, comp / "onnx")
    (comp / "int8").mkdir()
    quantize_dynamic(str(fp32), str(comp / "int8" / "model.onnx"), weight_type=QuantType.QInt8)
    (comp / "report.json").write_text(json.dumps({"artifacts": {"pruned": "pruned", "onnx_fp32": "onnx/model.onnx",
                                                                "onnx_int8": "int8"}}))
    (run / RUN_MARKER).write_text("test\n")
    return run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import make_tiny_csv
    from edgeft.data import load_dataset
    from edgeft.recipe import DataConfig

    return load_dataset(DataConfig(dataset=str(make_tiny_csv(tmp_path_factory.mktemp("d") / "toy.csv"))))


@pytest.fixture(scope="module")
def report(run_dir, dataset, tmp_path_factory):
    from edgeft.bench import bench_paths

    out = tmp_path_factory.mktemp("out")
    rep = bench_paths([run_dir], BenchConfig(**FAST), dataset, out, show_progress=False)
    return rep, out


def test_report_schema(report, run_dir):
    rep, out = report
    assert rep["schema"] == "edgeft.bench/1"
    assert json.loads((out / "bench.json").read_text())["schema"] == "edgeft.bench/1"
    for k in ("environment", "config", "method", "runtimes", "reference", "eval", "models", "results", "warnings"):
        assert k in rep
    env = rep["environment"]
    assert env["threads"]["inter_op"] == 1 and env["threads"]["intra_op"] >= 1
    assert "flags" in env["cpu"] and "torch" in env["versions"] and "onnxruntime" in env["versions"]
    assert rep["reference"] == {"model": "finetuned", "runtime": "torch-cpu", "precision": "fp32"}
    assert [m["name"] for m in rep["models"]] == ["finetuned", "pruned", "onnx_fp32", "onnx_int8"]

    ok = {r["key"]: r for r in rep["results"] if r["status"] == "ok"}
    assert set(ok) == {"finetuned/torch-cpu/fp32/b1/s16", "pruned/torch-cpu/fp32/b1/s16",
                       "onnx_fp32/ort-cpu/fp32/b1/s16", "onnx_int8/ort-cpu/int8/b1/s16"}
    for r in ok.values():
        assert len(r["samples_ms"]) == r["latency_ms"]["n"] >= 2 and len(r["e2e_samples_ms"]) > 0
        for stat in ("p50", "p90", "p99", "mean", "stdev", "cv", "cv_robust"):
            assert r["latency_ms"][stat] >= 0 and r["e2e_latency_ms"][stat] >= 0
        assert r["throughput_samples_per_s"] > 0 and r["size_mb"] > 0 and r["load_ms"] > 0
        assert r["memory"]["peak_rss_mb"] > 0 and "rss_delta_mb" in r["memory"]
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1 and "speedup_vs_reference" in r
        assert r["timing"]["warmup_iters"] >= 20
    assert ok["finetuned/torch-cpu/fp32/b1/s16"]["is_reference"]
    assert ok["finetuned/torch-cpu/fp32/b1/s16"]["speedup_vs_reference"] == pytest.approx(1.0)
    # the ONNX export computes the same logits as its torch parent
    assert ok["onnx_fp32/ort-cpu/fp32/b1/s16"]["agreement"] == 1.0
    assert ok["onnx_fp32/ort-cpu/fp32/b1/s16"]["max_abs_logit_diff"] < 1e-3
    assert ok["onnx_int8/ort-cpu/int8/b1/s16"]["precision"] == "int8"
    assert ok["onnx_int8/ort-cpu/int8/b1/s16"]["providers"][0] == "CPUExecutionProvider"
    # runtimes not present are listed with a reason, never silently dropped
    for r in rep["results"]:
        if r["status"] != "ok":
            assert r["status"] == "skipped" and r["reason"]
    assert rep["runtimes"]["torch-cpu"]["present"] and rep["eval"]["n"] > 0


def test_markdown_and_plot(report):
    _, out = report
    md = (out / "bench.md").read_text()
    assert "| model | runtime |" in md and "finetuned (ref)" in md and "onnx_int8" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_on_two_reports(report, run_dir, dataset, tmp_path):
    from edgeft.bench import bench_paths
    from edgeft.gate import gate

    rep, out = report
    kw = dict(max_latency_regression=0.25, max_accuracy_drop=0.5, normalize=False)
    # a report against itself: every ratio is exactly 1 and its bootstrap CI straddles it. The CI's half-width
    # is about CV/sqrt(n): tiny models timed in microseconds on a busy 2-core box reach CVs near 50%, so the
    # threshold here is wide (+90%) to make PASS certain; the 2x case below keeps +25%.
    same = gate(out / "bench.json", out / "bench.json", **{**kw, "max_latency_regression": 0.9}, max_cv=1.0)
    assert same.exit_code == 0 and same.verdict == "pass", same.render()
    lat = [c for c in same.comparisons if c.metric == "latency"]
    assert len(lat) == 4 and all(c.verdict == "ok" and c.change == 0 and c.ci[0] <= 0 <= c.ci[1] < 0.9
                                for c in lat)
    assert all(m["same"] for m in same.models.values()) and len(same.models) == 4

    # every sample twice as slow: REGRESSION on every latency key, exit 1
    slow = json.loads((out / "bench.json").read_text())
    for r in slow["results"]:
        if r["status"] == "ok":
            r["samples_ms"] = [2 * x + 0.001 for x in r["samples_ms"]]
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    res = gate(tmp_path / "slow.json", out / "bench.json", **kw)
    assert res.exit_code == 1 and res.verdict == "regression"
    assert [c.verdict for c in res.comparisons if c.metric == "latency"] == ["regression"] * 4, res.render()

    # a second real bench of the same models: same eval data, same accuracy, same checkpoints. Its latency
    # verdict is not asserted: tiny models time in microseconds on a shared machine (the A/B gate is the
    # tool for that; tests/unit/test_ab_gate.py).
    again = bench_paths([run_dir], BenchConfig(**FAST), dataset, tmp_path / "again", show_progress=False)
    res = gate(tmp_path / "again" / "bench.json", out / "bench.json", **kw)
    acc = [c for c in res.comparisons if c.metric == "accuracy"]
    assert len(acc) == 4 and {c.verdict for c in acc} == {"ok"} and all(c.change == 0 for c in acc)
    assert again["eval"]["sha256"] == rep["eval"]["sha256"] and all(m["same"] for m in res.models.values())
    assert len([c for c in res.comparisons if c.metric == "latency"]) == 4


def test_cli_bench_plain_folders(tmp_path, run_dir, tiny_csv):
    from edgeft.cli import cli

    out = tmp_path / "cli"
    onnx_dir = tmp_path / "onnx"  # a plain ONNX folder: model, tokenizer, config and edgeft.json together
    shutil.copytree(run_dir / "finetuned", onnx_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(run_dir / "compress" / "onnx" / "model.onnx", onnx_dir / "model.onnx")
    args = ["bench", str(run_dir / "finetuned"), str(onnx_dir / "model.onnx"),
            "--data", f"{tiny_csv}:test", "--runtimes", "torch-cpu,ort-cpu", "--seq", "16", "--batch", "1",
            "--threads", "1", "--out", str(out), "--quiet",
            "--set", "bench.min_samples=20", "--set", "bench.max_seconds_per_variant=0.2"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "bench.json").read_text())
    assert rep["config"]["runtimes"] == ["torch-cpu", "ort-cpu"] and rep["environment"]["threads"]["intra_op"] == 1
    assert {x["model"] for x in rep["results"]} == {"finetuned", "onnx"}
    assert all(x["status"] == "ok" for x in rep["results"])  # named runtimes only: nothing skipped
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 2 and "already exists" in r.output


def test_onnx_without_tokenizer_is_an_error(tmp_path, run_dir, dataset):
    from edgeft.bench import bench_paths
    from edgeft.errors import ModelError

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "compress" / "onnx" / "model.onnx", lone / "model.onnx")
    with pytest.raises(ModelError, match="no tokenizer"):
        bench_paths([lone], BenchConfig(**FAST), dataset, tmp_path / "o", show_progress=False)


@pytest.mark.gpu
def test_gpu_runtimes(run_dir, dataset, tmp_path):
    """torch-cuda (fp32, fp16) and, with onnxruntime-gpu, ort-cuda: numbers are GPU numbers, or refused."""
    from edgeft.bench import bench_paths
    from edgeft.bench.runtimes import detect_runtimes

    present = [rt for rt, d in detect_runtimes().items() if d["present"] and rt in ("torch-cuda", "ort-cuda")]
    rep = bench_paths([run_dir], BenchConfig(**{**FAST, "runtimes": present}), dataset, tmp_path, show_progress=False)
    ok = [r for r in rep["results"] if r["status"] == "ok"]
    assert {r["runtime"] for r in ok} == set(present)
    assert {r["precision"] for r in ok if r["runtime"] == "torch-cuda"} == {"fp32", "fp16"}
    for r in ok:
        if r["runtime"] == "ort-cuda":
            assert r["providers"][0] == "CUDAExecutionProvider"
        assert r["memory"]["gpu_mb"] is not None
    assert rep["environment"]["gpu"]["name"]
