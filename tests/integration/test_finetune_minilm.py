"""The real MiniLM on a small real Rotten Tomatoes subset, through the CLI."""

import json

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

pytestmark = pytest.mark.integration


def test_finetune_real_minilm_beats_majority_class(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, [
        "finetune", "recipes/minilm-rotten-tomatoes.yaml", "--out", str(out), "--quiet",
        "--set", "data.max_train_samples=1600", "--set", "data.max_eval_samples=300",
        "--set", "finetune.epochs=1", "--set", "finetune.lr=1e-4", "--set", "finetune.batch_size=16",
    ], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > metrics["majority_class"]["test"] + 0.05
    assert metrics["data"]["train"]["size"] == 1600
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"] == ["finetune"]
    assert "finetuned/model.safetensors" in manifest["files"]
    assert (out / "recipe.yaml").read_text().count("max_train_samples: 1600") == 1
