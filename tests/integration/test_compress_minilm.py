"""The real MiniLM: a quick fine-tune on a small Rotten Tomatoes subset, then the whole compress stage
(prune + distillation recovery, export, fusions, int8) through the CLI. Small subset, tiny recovery."""

import json

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

pytestmark = pytest.mark.integration

SMALL = ["--set", "data.max_train_samples=1200", "--set", "data.max_eval_samples=200"]


def test_compress_real_minilm(tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["finetune", "recipes/minilm-rotten-tomatoes.yaml", "--out", str(run), "--quiet",
                                 *SMALL, "--set", "finetune.epochs=1", "--set", "finetune.lr=1e-4"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [
        "compress", str(run), "--quiet", "--allow-miss", *SMALL,
        "--set", "compress.prune.importance_samples=128", "--set", "compress.prune.recovery.epochs=0.5",
        "--set", "compress.prune.recovery.lr=8e-5",
    ], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    comp = run / "compress"
    report = json.loads((comp / "report.json").read_text())
    assert report["schema"] == "edgeft.compress/1"
    assert set(report["artifacts"]) == {"pruned", "onnx_fp32", "onnx_optimized", "onnx_int8"}
    steps = {s["step"]: s for s in report["steps"]}
    # pruning really shrinks the model: 12 -> 8 heads, FFN 1536 -> 384 in every layer
    assert steps["prune"]["shapes"]["heads_after"] == [8] * 6
    assert steps["prune"]["shapes"]["ffn_after"] == [384] * 6
    assert steps["prune"]["params"] < 0.75 * steps["prune"]["params_before"]
    # float steps keep the function; fusions survive pruning
    assert steps["export"]["max_abs_logit_diff_vs_parent"] < 1e-3
    assert steps["optimize"]["fused_operators"].get("Attention") == 6
    # the 12 skip-layer-norms fuse, then become InstanceNormalization (ORT CPU's faster kernel)
    assert steps["optimize"]["fused_operators"].get("LayerNormAsInstanceNorm") == 12
    # int8 is small and still agrees with its float parent
    assert steps["quantize"]["size_mb"] < 0.30 * steps["export"]["size_mb"]
    assert steps["quantize"]["agreement_vs_parent"]["validation"] > 0.9
    assert steps["quantize"]["cpu_int8"]["flags"] is not None
    # the fine-tuned model beats chance and the compressed one is still a classifier
    assert steps["finetuned"]["validation"]["accuracy"] > 0.62
    assert steps["quantize"]["validation"]["accuracy"] > 0.58
    manifest = json.loads((run / "manifest.json").read_text())
    assert "compress/int8/model.onnx" in manifest["files"]
