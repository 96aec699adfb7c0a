"""`edgeft compress` through the CLI: the happy path on a tiny model, the goal-missed path, and every
bad-input case (exit 2, one line, no compress/ folder left behind)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from edgeft.cli import cli

FAST = {"prune": {"heads": 0.5, "ffn": 0.5, "importance_samples": 32, "recovery": {"epochs": 0.25}},
        "optimize": {"level": 1}}


def _recipe(tmp_path: Path, tiny_csv: Path, compress: dict | None = None) -> Path:
    data = {"name": "tiny", "data": {"dataset": str(tiny_csv)},
            "finetune": {"max_length": 32, "batch_size": 16, "eval_batch_size": 64},
            "compress": {**FAST, **(compress or {})}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(args: list[str]):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def test_compress_happy_path(tiny_model_dir, tiny_csv, tmp_path):
    recipe = _recipe(tmp_path, tiny_csv, {"max_accuracy_drop": 100})
    code, out = _run(["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                      "--quiet"])
    assert code == 0, out
    comp = tmp_path / "run" / "compress"
    report = json.loads((comp / "report.json").read_text())
    assert report["schema"] == "edgeft.compress/1"
    assert report["artifacts"] == {"pruned": "pruned", "onnx_fp32": "onnx/model.onnx",
                                   "onnx_optimized": "optimized/model.onnx", "onnx_int8": "int8/model.onnx"}
    assert report["goal_met"] is True and report["final"] == "int8/model.onnx"
    assert [s["step"] for s in report["steps"]] == ["finetuned", "prune", "export", "optimize", "quantize"]
    prune, export, opt, quant = report["steps"][1:]
    assert prune["params"] < prune["params_before"] and prune["reload_max_abs_diff"] <= 1e-4
    assert export["max_abs_logit_diff_vs_parent"] <= 1e-3 and opt["fused_operators"].get("Attention") == 2
    assert quant["cpu_int8"]["flags"] is not None and "fp32_nodes" in quant
    for step in report["steps"]:
        assert {"validation", "test"} <= set(step) and "size_mb" in step and "params" in step
    for folder in ("onnx", "optimized", "int8", "pruned"):
        for name in ("config.json", "edgeft.json", "vocab.txt"):
            assert (comp / folder / name).is_file(), f"{folder}/{name}"
    assert not list(comp.glob(".*"))  # no work folders left
    from edgeft.modeling import load_classifier

    assert load_classifier(str(comp / "pruned")).config.intermediate_size == 32


def test_goal_missed_writes_everything_then_exits_1(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    from edgeft.evaluate import SplitEvaluator

    real = SplitEvaluator.onnx_logits

    def wrong_for_int8(self, path, *args, **kwargs):
        logits = real(self, path, *args, **kwargs)
        if "quantize-work" in str(path) or str(path).endswith("int8/model.onnx"):
            # every prediction wrong: a quantization that destroys the model
            for split, lg in logits.items():
                labels = np.asarray(self.dataset.split(split).labels)
                lg[:] = np.eye(lg.shape[1])[(labels + 1) % lg.shape[1]]
        return logits

    monkeypatch.setattr(SplitEvaluator, "onnx_logits", wrong_for_int8)
    recipe = _recipe(tmp_path, tiny_csv, {"prune": None, "max_accuracy_drop": 5.0,
                                          "quantize": {"sensitivity_budget": 2}})
    code, out = _run(["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                      "--quiet"])
    assert code == 1, out
    assert "accuracy goal missed" in out and len(out.strip().splitlines()) == 1
    report = json.loads((tmp_path / "run" / "compress" / "report.json").read_text())
    assert report["goal_met"] is False
    assert report["final"] == "optimized/model.onnx" and report["final_meets_goal"] is True
    quant = report["steps"][-1]
    assert len(quant["sensitivity"]) > 0 and [len(a["fp32_nodes"]) for a in quant["attempts"]] == [0, 1, 2]
    # --allow-miss: same result, exit 0
    code, out = _run(["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "run2"),
                      "--quiet", "--allow-miss"])
    assert code == 0, out


def _bad(tmp_path: Path, tiny_csv: Path, model: Path, compress: dict | None = None,
         extra: list[str] | None = None) -> str:
    recipe = _recipe(tmp_path, tiny_csv, compress)
    out_dir = tmp_path / "run"
    code, out = _run(["compress", str(model), "--recipe", str(recipe), "--out", str(out_dir), "--quiet",
                      *(extra or [])])
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert not (out_dir / "compress").exists()
    assert not list(out_dir.glob(".compress*")) if out_dir.exists() else True
    return lines[0]


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tiny_model_dir, tiny_csv, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    (model / "config.json").unlink()
    assert "config.json" in _bad(tmp_path, tiny_csv, model)


def test_missing_tokenizer(tiny_model_dir, tiny_csv, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    for name in ("vocab.txt", "tokenizer.json"):
        (model / name).unlink(missing_ok=True)
    assert "tokenizer" in _bad(tmp_path, tiny_csv, model)


def test_truncated_safetensors(tiny_model_dir, tiny_csv, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert "safetensors" in _bad(tmp_path, tiny_csv, model)


def test_unsupported_architecture_for_the_pruner(tiny_model_dir, tiny_csv, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model_dir = tmp_path / "gpt2"
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=30, pad_token_id=0,
                                             num_labels=2)).save_pretrained(model_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    msg = _bad(tmp_path, tiny_csv, model_dir)
    assert "gpt2" in msg and "bert" in msg.lower()


@pytest.mark.parametrize("heads,expected", [(1.0, "compress.prune.heads"), (0.9, "would remove all 4 heads")])
def test_pruning_target_out_of_range(tiny_model_dir, tiny_csv, tmp_path, heads, expected):
    assert expected in _bad(tmp_path, tiny_csv, tiny_model_dir, {"prune": {"heads": heads}})


@pytest.mark.parametrize("samples,expected", [(8, "calibration set too small"), (100000, "calibration set too small")])
def test_calibration_set_too_small(tiny_model_dir, tiny_csv, tmp_path, samples, expected):
    cfg = {"prune": None, "quantize": {"mode": "static", "calibration": {"samples": samples}}}
    assert expected in _bad(tmp_path, tiny_csv, tiny_model_dir, cfg)


def test_label_mismatch(tmp_path, tiny_csv):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import make_tiny_classifier

    model = make_tiny_classifier(tmp_path / "three", num_labels=3)
    assert "labels" in _bad(tmp_path, tiny_csv, model)


# ---------------------------------------------------------------- issue 8: each stage reads its own section


class _Stop(Exception):
    pass


def _load(tmp_path: Path, tiny_csv: Path, finetune: dict, compress: dict | None = None):
    from edgeft.data import load_dataset
    from edgeft.recipe import recipe_from_dict

    r = recipe_from_dict({"name": "tiny", "data": {"dataset": str(tiny_csv)},
                          "finetune": {"max_length": 32, **finetune}, "compress": {**FAST, **(compress or {})}})
    return r, load_dataset(r.data, seed=r.seed)


def test_finetune_settings_do_not_reach_compress(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    """finetune.batch_size/warmup_ratio/weight_decay/grad_clip/threads used to drive recovery and importance."""
    import edgeft.finetune
    import edgeft.prune
    import edgeft.train
    from edgeft.compress import compress

    seen: list[dict] = []
    real_importance, real_threads = edgeft.prune.importance, edgeft.finetune.set_threads

    def spy_importance(*args, **kwargs):
        seen[-1]["importance_batch_size"] = kwargs["batch_size"]
        return real_importance(*args, **kwargs)

    def spy_threads(n):
        seen.append({"threads": n})
        return real_threads(n)

    def spy_train(model, tok, train, val, names, settings, **kwargs):
        seen[-1]["recovery"] = settings
        raise _Stop

    monkeypatch.setattr(edgeft.prune, "importance", spy_importance)
    monkeypatch.setattr(edgeft.finetune, "set_threads", spy_threads)
    monkeypatch.setattr(edgeft.train, "train_classifier", spy_train)
    odd = {"batch_size": 7, "warmup_ratio": 0.4, "weight_decay": 0.2, "grad_clip": 9.0, "threads": 1,
           "eval_batch_size": 3}
    for i, ft in enumerate(({}, odd)):
        r, ds = _load(tmp_path, tiny_csv, ft)
        with pytest.raises(_Stop):
            compress(tiny_model_dir, r, ds, tmp_path / f"c{i}", show_progress=False)
    default, changed = seen
    assert default == changed  # nothing of finetune.* reached the compress stage
    from edgeft.recipe import PruneConfig, RecoveryConfig

    rc, s = RecoveryConfig(), default["recovery"]
    assert (s.batch_size, s.warmup_ratio, s.weight_decay, s.grad_clip) == (rc.batch_size, rc.warmup_ratio,
                                                                         rc.weight_decay, rc.grad_clip)
    assert default["importance_batch_size"] == PruneConfig().importance_batch_size and default["threads"] is None

    # ... and compress's own fields do reach it
    seen.clear()
    r, ds = _load(tmp_path, tiny_csv, {}, {"threads": 1, "prune": {**FAST["prune"], "importance_batch_size": 5,
                                                                   "recovery": {"epochs": 0.25, "batch_size": 4,
                                                                                "grad_clip": 2.0}}})
    with pytest.raises(_Stop):
        compress(tiny_model_dir, r, ds, tmp_path / "c3", show_progress=False)
    got = seen[0]
    assert got["threads"] == 1 and got["importance_batch_size"] == 5
    assert got["recovery"].batch_size == 4 and got["recovery"].grad_clip == 2.0
    assert not (tmp_path / "c3").exists()


def test_compress_model_takes_only_its_section(tiny_model_dir, tiny_csv, tmp_path):
    import inspect

    from edgeft.compress import compress_model
    from edgeft.recipe import CompressConfig

    params = inspect.signature(compress_model).parameters
    assert params["cfg"].annotation in (CompressConfig, "CompressConfig")
    assert "recipe" not in params


# ---------------------------------------------------------------- issue 8: hardware-aware int8


def _int8_report(tmp_path, tiny_csv, tiny_model_dir, name, compress=None):
    recipe = _recipe(tmp_path, tiny_csv, {"prune": None, "max_accuracy_drop": 100, **(compress or {})})
    code, out = _run(["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / name),
                      "--quiet"])
    assert code == 0, out
    report = json.loads((tmp_path / name / "compress" / "report.json").read_text())
    return report, next(s for s in report["steps"] if s["step"] == "quantize")


NO_VNNI = {"model": "AMD EPYC (test)", "flags": ["avx2"], "has_vnni": False, "has_amx_int8": False}
VNNI = {"model": "Xeon (test)", "flags": ["avx2", "avx512f", "avx512_vnni"], "has_vnni": True, "has_amx_int8": False}


def test_int8_without_vnni_tries_the_documented_remedies_and_chooses_on_validation(tiny_model_dir, tiny_csv,
                                                                                     tmp_path, monkeypatch):
    import onnx

    import edgeft.quantize
    from edgeft.evaluate import SplitEvaluator

    monkeypatch.setattr(edgeft.quantize, "cpu_int8_info", lambda: dict(NO_VNNI))
    real = SplitEvaluator.onnx_logits

    def u8s8_saturates(self, path, *args, **kwargs):
        logits = real(self, path, *args, **kwargs)
        if Path(path).parent.name in ("try0", "try1"):  # the u8s8 candidates: every prediction wrong
            for split, lg in logits.items():
                labels = np.asarray(self.dataset.split(split).labels)
                lg[:] = np.eye(lg.shape[1])[(labels + 1) % lg.shape[1]]
        return logits

    monkeypatch.setattr(SplitEvaluator, "onnx_logits", u8s8_saturates)
    report, q = _int8_report(tmp_path, tiny_csv, tiny_model_dir, "novnni")
    choice = q["scheme_choice"]
    assert choice["cpu"]["has_vnni"] is False and choice["cpu"]["flags"] == ["avx2"]
    assert "VNNI" in choice["reason"] and "reduce_range" in choice["reason"]
    assert [c["scheme"] for c in choice["candidates"]] == ["u8s8", "u8s8-reduce-range", "u8u8"]
    assert [c["reduce_range"] for c in choice["candidates"]] == [False, True, False]
    assert [c["weights"] for c in choice["candidates"]] == ["s8", "s8", "u8"]
    accs = [c["validation_accuracy"] for c in choice["candidates"]]
    assert accs[0] == accs[1] == 0.0 and accs[2] > 0.0
    assert choice["chosen"] == q["scheme"] == "u8u8" and q["weights"] == "u8" and q["reduce_range"] is False
    assert q["cpu_int8"] == NO_VNNI and q["sensitivity"] == {}  # a remedy, not the sensitivity fallback
    model = onnx.load(str(tmp_path / "novnni" / "compress" / "int8" / "model.onnx"))
    quantized = [t for t in model.graph.initializer if t.name.endswith("_quantized")]
    assert quantized and all(t.data_type == onnx.TensorProto.UINT8 for t in quantized)
    assert report["goal_met"] is True


def test_int8_with_vnni_keeps_the_configured_scheme(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    import edgeft.quantize

    monkeypatch.setattr(edgeft.quantize, "cpu_int8_info", lambda: dict(VNNI))
    _, q = _int8_report(tmp_path, tiny_csv, tiny_model_dir, "vnni")
    assert [c["scheme"] for c in q["scheme_choice"]["candidates"]] == ["u8s8"]
    assert q["scheme"] == "u8s8" and q["weights"] == "s8" and "configured scheme only" in q["scheme_choice"]["reason"]


def test_int8_schemes_ties_keep_the_configured_one():
    from edgeft.quantize import int8_schemes

    names = lambda rr, cpu: [s.name for s in int8_schemes(rr, cpu)[0]]  # noqa: E731
    assert names(False, NO_VNNI) == ["u8s8", "u8s8-reduce-range", "u8u8"]
    assert names(True, NO_VNNI) == ["u8s8-reduce-range", "u8u8"]
    assert names(False, VNNI) == ["u8s8"] and names(False, {**NO_VNNI, "has_amx_int8": True}) == ["u8s8"]


# ---------------------------------------------------------------- issue 8: report, checker, rendering


def test_report_records_the_checker_run_and_has_no_private_keys(tiny_model_dir, tiny_csv, tmp_path):
    import onnx

    report, _ = _int8_report(tmp_path, tiny_csv, tiny_model_dir, "chk")
    export = next(s for s in report["steps"] if s["step"] == "export")
    assert export["checker"]["check_model"] == "basic" and export["checker"]["ok"] is True
    assert export["checker"]["onnx_version"] == onnx.__version__
    assert "CPUExecutionProvider" in export["checker"]["ort_session"]

    def keys(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from keys(v)
        elif isinstance(x, list):
            for v in x:
                yield from keys(v)

    assert not [k for k in keys(report) if str(k).startswith("_")]
    # units: durations end in _s, sizes are 10^6 bytes
    assert not [k for k in keys(report) if "seconds" in str(k)]
    assert "wall_s" in report and all("elapsed_s" in s for s in report["steps"])
    onnx_file = tmp_path / "chk" / "compress" / "onnx" / "model.onnx"
    assert export["size_mb"] == onnx_file.stat().st_size / 1e6


def test_the_library_does_not_render_the_cli_does(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import edgeft.progress
    from edgeft.compress import compress

    buf = io.StringIO()
    monkeypatch.setattr(edgeft.progress, "console", Console(file=buf, width=200))
    r, ds = _load(tmp_path, tiny_csv, {}, {"prune": None, "quantize": None, "max_accuracy_drop": 100})
    compress(tiny_model_dir, r, ds, tmp_path / "lib", show_progress=True)
    assert "compress" in buf.getvalue() and "val acc" not in buf.getvalue()  # progress lines, no table
    recipe = _recipe(tmp_path, tiny_csv, {"prune": None, "quantize": None, "max_accuracy_drop": 100})
    code, out = _run(["compress", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "cli")])
    assert code == 0, out
    assert "val acc" in buf.getvalue() and "goal met" in buf.getvalue()
