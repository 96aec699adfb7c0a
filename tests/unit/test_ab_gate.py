"""The in-run A/B gate: its sequential test (simulated), and real interleaved runs on tiny models."""

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_tiny_classifier
from edgeft.ab_gate import (ABConfig, ab_gate, look_alpha, next_look, paired_interval, pairs_needed,
                            sequential_decision, t_quantile)
from edgeft.cli import cli
from edgeft.errors import EdgeftError

# Small budgets: tiny models time in well under a millisecond; one thread (the machines are shared).
FAST = dict(threads=1, budget_s=12.0, min_rounds=8, max_latency_regression=0.25)


@pytest.mark.parametrize("q, df, expected", [(0.975, 9, 2.2622), (0.995, 5, 4.0321), (0.975, 30, 2.0423),
                                             (0.975, 1, 12.7062), (0.9995, 100, 3.3905)])
def test_t_quantile(q, df, expected):
    assert t_quantile(q, df) == pytest.approx(expected, abs=2e-4)


def test_alpha_spending_sums_to_alpha_and_looks_grow():
    assert sum(look_alpha(j, 0.05) for j in range(1, 100_000)) == pytest.approx(0.05, rel=1e-4)
    looks = [10]
    while looks[-1] < 100:
        looks.append(next_look(looks[-1]))
    assert looks[:5] == [10, 15, 23, 35, 53]


@pytest.mark.parametrize("mu, expect", [(0.0, "pass"), (math.log(1.2), "regression"), (math.log(0.8), "pass")])
def test_sequential_test_far_from_the_threshold_never_errs(mu, expect):
    rng = np.random.default_rng(0)
    verdicts = {sequential_decision(rng.normal(mu, 0.10, 60), 0.10, min_pairs=10, alpha=0.05)[0] for _ in range(300)}
    assert verdicts == {expect}


def test_sequential_error_rate_at_the_threshold_is_bounded():
    """A model exactly at the threshold: any verdict but INCONCLUSIVE is an error; alpha/2 each at most."""
    rng = np.random.default_rng(1)
    n = 1000
    out = [sequential_decision(rng.normal(math.log1p(0.10), 0.10, 80), 0.10, min_pairs=10, alpha=0.05)[0]
           for _ in range(n)]
    assert out.count("regression") / n <= 0.025 + 0.015 and out.count("pass") / n <= 0.025 + 0.015
    # the reason for spending: a fixed 95% interval checked at every pair would err far more often
    naive = 0
    for _ in range(300):
        x = rng.normal(math.log1p(0.10), 0.10, 80)
        for k in range(10, 81):
            m, s = x[:k].mean(), x[:k].std(ddof=1)
            if m - 1.96 * s / math.sqrt(k) > math.log1p(0.10):
                naive += 1
                break
    assert naive / 300 > 0.04


def test_inconclusive_estimates_what_would_resolve_it():
    rng = np.random.default_rng(2)
    x = rng.normal(math.log(1.15), 0.2, 12)
    verdict, iv, looks = sequential_decision(x, 0.10, min_pairs=10, alpha=0.05)
    assert verdict == "inconclusive" and looks == 2 and iv.pairs == 12
    need = pairs_needed(iv, 0.10)
    assert need > 12
    more = paired_interval(np.resize(x, need), 2, 0.05)  # same mean and spread, `need` pairs
    assert more.lo > 1.10 or more.hi < 1.10 or abs(more.lo - 1.10) < 0.02


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    small = make_tiny_classifier(root / "small")
    big = make_tiny_classifier(root / "big", layers=12, hidden=128, intermediate=512)  # ~20x the work
    return small, big


def test_identical_models_pass(models):
    small, _ = models
    res = ab_gate(ABConfig(baseline=small, candidate=small, **FAST))
    assert res.verdict == "pass" and res.exit_code == 0, res.render()
    assert res.interval["hi"] < 1.25 and res.pairs >= 4 and res.looks >= 1
    assert "same model files" in res.render() and res.sides[0]["identity"] == res.sides[1]["identity"]
    d = res.to_dict()
    assert d["schema"] == "edgeft.ab-gate/1" and d["exit_code"] == 0 and len(d["pair_ratios"]) == res.pairs
    json.dumps(d)


def test_a_much_slower_candidate_is_a_regression(models):
    small, big = models
    res = ab_gate(ABConfig(baseline=small, candidate=big, **FAST))
    assert res.verdict == "regression" and res.exit_code == 1, res.render()
    assert res.interval["lo"] > 1.25 and res.latency_verdict == "regression"
    assert res.sides[0]["identity"] != res.sides[1]["identity"]
    assert res.per_side["candidate"]["p50_ms"] > 3 * res.per_side["baseline"]["p50_ms"]


def test_budget_out_before_the_first_look_is_inconclusive(models):
    small, _ = models
    res = ab_gate(ABConfig(baseline=small, candidate=small, threads=1, budget_s=0.5, min_rounds=200))
    assert res.verdict == "inconclusive" and res.exit_code == 1
    assert res.interval is None and "raise --budget-seconds" in res.render()


def test_threads_per_side_are_applied(models):
    small, _ = models
    res = ab_gate(ABConfig(baseline=small, candidate=small, **(FAST | {"threads": None, "budget_s": 2.0,
                                                                      "min_rounds": 4}),
                           baseline_threads=1, candidate_threads=2))
    assert [s["threads"] for s in res.sides] == [1, 2] and "thread counts differ" in res.render()


def test_cli_ab_mode_json_and_exit_codes(models, tmp_path):
    small, big = models
    out = tmp_path / "gate.json"
    common = ["--threads", "1", "--budget-seconds", "12", "--min-rounds", "8", "--max-latency-regression", "25%"]
    r = CliRunner().invoke(cli, ["gate", "--baseline-model", str(small), "--candidate", str(big), *common,
                                 "--json-out", str(out)])
    assert r.exit_code == 1 and "REGRESSION" in r.output.splitlines()[0], r.output
    d = json.loads(out.read_text())
    assert d["verdict"] == "regression" and d["interval"]["lo"] > 1.25 and d["sides"][1]["path"] == str(big)


@pytest.mark.parametrize("args, needle", [
    (["--baseline-model", "X"], "needs both --baseline-model and --candidate"),
    (["--baseline-model", "nope", "--candidate", "nope2"], "not found"),
    (["cur.json", "--baseline-model", "a", "--candidate", "b"], "belong to the stored-baseline mode"),
    (["cur.json", "--baseline", "b.json", "--budget-seconds", "5"], "belong to the A/B mode"),
    ([], "nothing to gate"),
    (["--baseline-model", "{small}", "--candidate", "{small}", "--budget-seconds", "0"], "--budget-seconds 0"),
    (["--baseline-model", "{small}", "--candidate", "{small}", "--candidate-threads", "0"], "candidate-threads 0"),
    (["--baseline-model", "{small}", "--candidate", "{small}", "--batch", "0"], "batch 0"),
    (["--baseline-model", "{small}", "--candidate", "{small}", "--budget-seconds", "nan"], "--budget-seconds nan"),
    (["--baseline-model", "{small}", "--candidate", "{small}", "--max-latency-regression", "nan"], "nan"),
    (["cur.json", "--baseline", "b.json", "--seq", "64"], "belong to the A/B mode"),
])
def test_cli_ab_bad_input_is_exit_2(models, args, needle):
    small, _ = models
    r = CliRunner().invoke(cli, ["gate", *[a.format(small=small) for a in args]])
    assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_accuracy_on_the_same_texts(models, tiny_csv):
    small, _ = models
    res = ab_gate(ABConfig(baseline=small, candidate=small, data=f"{tiny_csv}:test", max_eval_samples=40, **FAST))
    a = res.accuracy
    assert a["baseline"] == a["candidate"] and a["change_points"] == 0 and a["verdict"] == "ok" and a["n"] == 40
    assert "accuracy" in res.render() and res.verdict == "pass", res.render()


def test_config_rejects_nan_threshold_and_drop(models):
    small, _ = models
    with pytest.raises(EdgeftError):
        ABConfig(baseline=small, candidate=small, max_latency_regression=float("nan"))
    with pytest.raises(EdgeftError):
        ABConfig(baseline=small, candidate=small, max_accuracy_drop=float("nan"))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A real tiny run (finetune -> compress) and its bundle, as `edgeft ship` writes it."""
    from conftest import make_tiny_csv
    from edgeft.pipeline import run
    from edgeft.recipe import load_recipe
    from edgeft.ship import ShipConfig, ship

    base = tmp_path_factory.mktemp("abrun")
    model, csv = make_tiny_classifier(base / "model"), make_tiny_csv(base / "toy.csv")
    recipe = load_recipe(None, [
        "name=tiny", f"model.name={model}", f"data.dataset={csv}", "finetune.epochs=1", "finetune.max_length=32",
        "finetune.batch_size=16", "compress.prune=null", "compress.optimize.level=1", "compress.max_accuracy_drop=100",
        "stages=[finetune,compress]"])
    run_dir = run(recipe, base / "run", show_progress=False)
    ship(ShipConfig(run_dir=run_dir, out=base / "bundle", golden=8, latency_seconds=0.3))
    return run_dir, base / "bundle"


def test_bundle_against_its_run_folder(shipped, tmp_path):
    """OLD = the previous release's bundle, NEW = a run folder (its shipped variant): same model, PASS."""
    run_dir, bundle = shipped
    res = ab_gate(ABConfig(baseline=bundle, candidate=run_dir, **FAST))
    kinds = [(s["kind"], s["format"]) for s in res.sides]
    assert kinds == [("bundle", "onnx"), ("run", "onnx")], res.sides
    assert res.sides[1]["model"] in ("onnx_fp32", "onnx_optimized", "onnx_int8")
    assert res.verdict == "pass", res.render()
    # a bundle whose files were changed is refused before anything is timed
    shutil.copytree(bundle, tmp_path / "b")
    (tmp_path / "b" / "model" / "labels.txt").write_text("x\ny\n")
    with pytest.raises(EdgeftError, match="checksums"):
        ab_gate(ABConfig(baseline=tmp_path / "b", candidate=run_dir, **FAST))


def test_inconclusive_output_says_what_would_have_resolved_it():
    from edgeft.ab_gate import ABResult

    iv = {"ratio": 1.09, "lo": 1.01, "hi": 1.18, "confidence": 0.99, "width": 0.17}
    res = ABResult(verdict="inconclusive", threshold=0.10, sides=[], interval=iv, latency_verdict="inconclusive",
                   rounds=60, pairs=30, looks=5, measure_s=30.2, wall_s=35.0, budget_s=30.0, alpha=0.05,
                   needed={"pairs": 400, "rounds": 800, "samples_per_side": 24000, "seconds": 380.0,
                           "budget_s": 384.0, "ci_width": 0.17})
    text = res.render()
    assert res.exit_code == 1 and text.startswith("gate (A/B, interleaved in one process): INCONCLUSIVE")
    assert "0.170 wide" in text and "about 400 pairs (800 rounds, ~24000 samples per side, ~380s" in text
    assert "--budget-seconds 384" in text and res.to_dict()["needed"]["pairs"] == 400
