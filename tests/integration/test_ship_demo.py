"""Ship and verify the real demo run (fine-tuned MiniLM on Rotten Tomatoes -> compress -> bench).

Needs a finished run folder: EDGEFT_DEMO_RUN=runs/<x> (default runs/demo in the repository); skipped
without one, since making it takes ~10 minutes (`make demo`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

pytestmark = pytest.mark.integration
RUN = Path(os.environ.get("EDGEFT_DEMO_RUN", Path(__file__).parents[2] / "runs" / "demo"))


@pytest.mark.skipif(not (RUN / "compress" / "report.json").is_file() or not (RUN / "recipe.yaml").is_file(),
                    reason=f"no finished run folder at {RUN} (set EDGEFT_DEMO_RUN)")
def test_ship_and_verify_the_demo_run(tmp_path):
    out = tmp_path / "bundle"
    res = CliRunner().invoke(cli, ["ship", str(RUN), "--out", str(out), "--latency-seconds", "3"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    report = json.loads((RUN / "compress" / "report.json").read_text())
    assert m["variant"]["meets_goal"] and m["golden"]["count"] == 256
    assert m["labels"] == report["label_names"] and m["tokenizer"]["max_length"] == report["max_length"]
    # 256 golden texts from the test split: their accuracy is the model's test accuracy, within sampling error
    assert abs(m["golden"]["accuracy_vs_truth"] - m["accuracy"]["test"]["accuracy"]) < 0.08
    res = CliRunner().invoke(cli, ["verify", str(out), "--skip-latency"])
    assert res.exit_code == 0 and "256/256 labels same" in res.output, res.output
