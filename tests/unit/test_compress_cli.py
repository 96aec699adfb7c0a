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
    import edgeft.compress as comp_mod

    real = comp_mod._Eval.onnx_logits

    def wrong_for_int8(self, path):
        logits = real(self, path)
        if "quantize-work" in str(path) or str(path).endswith("int8/model.onnx"):
            # every prediction wrong: a quantization that destroys the model
            for split, lg in logits.items():
                labels = np.asarray(self.dataset.split(split).labels)
                lg[:] = np.eye(lg.shape[1])[(labels + 1) % lg.shape[1]]
        return logits

    monkeypatch.setattr(comp_mod._Eval, "onnx_logits", wrong_for_int8)
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
