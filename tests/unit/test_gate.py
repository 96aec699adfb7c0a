"""The gate on synthetic reports: shifts it must catch, noise it must ignore, bad input it must refuse."""

import json

import numpy as np
import pytest

from edgeft.errors import EdgeftError
from edgeft.gate import gate, parse_fraction

MODELS = {"finetuned": ("torch-cpu", "fp32", 30.0), "onnx_int8": ("ort-cpu", "int8", 9.0)}


def make_report(path, *, seed=0, scale=None, sigma=0.03, n=600, accuracy=None, models=MODELS,
                schema="edgeft.bench/1", eval_sha="abc", threads=2, cpu="cpu-A", seqs=(128,), files=None):
    """A bench.json with lognormal samples; ``scale`` multiplies a model's latency; ``files`` gives a model's
    {file: sha256} (default: the same for every report)."""
    rng = np.random.default_rng(seed)
    scale = scale or {}
    accuracy = accuracy or {}
    results = []
    for name, (rt, prec, median) in models.items():
        for s in seqs:
            samples = median * scale.get(name, 1.0) * rng.lognormal(0, sigma, n)
            results.append({"key": f"{name}/{rt}/{prec}/b1/s{s}", "model": name, "runtime": rt, "precision": prec,
                            "batch": 1, "seq": s, "status": "ok", "samples_ms": samples.round(4).tolist(),
                            "accuracy": accuracy.get(name, 0.85)})
        results.append({"key": f"{name}/torch-cuda/fp16/b1/s128", "model": name, "runtime": "torch-cuda",
                        "precision": "fp16", "batch": 1, "seq": 128, "status": "skipped", "reason": "no GPU"})
    files = files or {}
    report = {"schema": schema, "environment": {"threads": {"intra_op": threads}, "cpu": {"model": cpu}},
              "models": [{"name": name, "files": files.get(name, {"model.onnx": "0" * 63 + str(i)})}
                         for i, name in enumerate(models)],
              "reference": {"model": "finetuned", "runtime": "torch-cpu", "precision": "fp32"},
              "eval": {"dataset": "rt", "split": "test", "n": 100, "sha256": eval_sha}, "results": results}
    path.write_text(json.dumps(report))
    return path


def run(tmp_path, cur_kw=None, base_kw=None, **gate_kw):
    base = make_report(tmp_path / "base.json", **(base_kw or {}))
    cur = make_report(tmp_path / "cur.json", **({"seed": 1} | (cur_kw or {})))
    kw = {"max_latency_regression": 0.10, "max_accuracy_drop": 0.5, "normalize": False} | gate_kw
    return gate(cur, base, **kw)


@pytest.mark.parametrize("seed", range(1, 6))
def test_noise_is_ignored(tmp_path, seed):
    res = run(tmp_path, cur_kw={"seed": seed, "scale": {"finetuned": 1.03, "onnx_int8": 0.98}})
    assert res.exit_code == 0 and res.verdict == "pass", res.render()
    assert {c.verdict for c in res.comparisons} <= {"ok", "improvement"}


def test_twenty_percent_slower_is_caught(tmp_path):
    res = run(tmp_path, cur_kw={"scale": {"onnx_int8": 1.2}})
    assert res.exit_code == 1 and res.verdict == "regression"
    (reg,) = [c for c in res.comparisons if c.verdict == "regression"]
    assert reg.key == "onnx_int8/ort-cpu/int8/b1/s128" and reg.change == pytest.approx(0.2, abs=0.02)
    assert reg.ci[0] > 0.1 and reg.p_value < 1e-6
    text = res.render()
    assert "REGRESSION" in text.splitlines()[0] and "onnx_int8/ort-cpu/int8/b1/s128" in text and "+2" in text


def test_shift_below_threshold_passes(tmp_path):
    res = run(tmp_path, cur_kw={"scale": {"onnx_int8": 1.05}})
    assert res.exit_code == 0


def test_faster_is_reported_as_improvement(tmp_path):
    res = run(tmp_path, cur_kw={"scale": {"onnx_int8": 0.7}})
    assert res.exit_code == 0 and any(c.verdict == "improvement" for c in res.comparisons)


def test_unstable_is_inconclusive_and_fails(tmp_path):
    res = run(tmp_path, cur_kw={"sigma": 0.3})
    assert res.verdict == "inconclusive" and res.exit_code == 1
    assert "INCONCLUSIVE" in res.render() and "robust CV" in res.render()


def test_noise_the_ci_resolves_does_not_block(tmp_path):
    # robust CV ~12% (like int8 runs on a shared 2-core box) but 3000 samples: the median is known to ~1%
    res = run(tmp_path, cur_kw={"sigma": 0.12, "n": 3000}, base_kw={"sigma": 0.12, "n": 3000})
    assert res.exit_code == 0, res.render()
    assert "noisy" in res.render()
    res = run(tmp_path, cur_kw={"sigma": 0.12, "n": 3000, "scale": {"onnx_int8": 1.2}},
              base_kw={"sigma": 0.12, "n": 3000})
    assert res.verdict == "regression"


def test_ci_holding_the_threshold_is_inconclusive_and_says_what_is_needed(tmp_path):
    res = run(tmp_path, cur_kw={"sigma": 0.15, "n": 40, "scale": {"onnx_int8": 1.12}},
              base_kw={"sigma": 0.15, "n": 40})
    assert res.verdict == "inconclusive" and res.exit_code == 1, res.render()
    (inc,) = [c for c in res.comparisons if c.verdict == "inconclusive"]
    assert inc.key.startswith("onnx_int8") and "holds the +10% threshold" in inc.detail
    assert inc.needed["samples_per_side"] > 40 and inc.needed["seconds"] > 0
    assert f"about {inc.needed['samples_per_side']} samples per side" in res.render()
    assert res.to_dict()["comparisons"][1]["needed"] == inc.needed


def test_a_ci_wider_than_the_threshold_but_wholly_below_it_passes(tmp_path):
    res = run(tmp_path, cur_kw={"sigma": 0.15, "n": 40}, base_kw={"sigma": 0.15, "n": 40})
    assert all(c.ci[1] < 0.10 for c in res.comparisons if c.metric == "latency"), res.render()
    assert res.verdict == "pass"


def test_whole_ci_beyond_the_threshold_is_a_regression_whatever_the_cv(tmp_path):
    # probe: a 1-thread run, +61% (CI +55..+72%) with robust CV 36%, came out INCONCLUSIVE
    res = run(tmp_path, cur_kw={"sigma": 0.4, "n": 3000, "scale": {"finetuned": 1.6, "onnx_int8": 1.6}})
    assert res.verdict == "regression" and res.exit_code == 1, res.render()
    for c in res.comparisons:
        if c.metric == "latency":
            assert c.verdict == "regression" and c.ci[0] > 0.10 and "unstable" in c.detail


def test_unstable_within_threshold_stays_inconclusive_with_advice(tmp_path):
    res = run(tmp_path, cur_kw={"sigma": 0.4, "n": 600, "scale": {"onnx_int8": 1.1}})
    (inc,) = [c for c in res.comparisons if c.key.startswith("onnx_int8") and c.metric == "latency"]
    assert inc.verdict == "inconclusive" and "quieter machine" in inc.detail


def test_big_noisy_shift_with_few_samples_is_not_a_pass(tmp_path):
    res = run(tmp_path, cur_kw={"n": 10, "scale": {"onnx_int8": 1.5}}, base_kw={"n": 10})
    assert res.exit_code == 1 and res.verdict == "inconclusive" and "too few samples" in res.render()


def test_accuracy_drop(tmp_path):
    res = run(tmp_path, cur_kw={"accuracy": {"onnx_int8": 0.84}})  # -1 pt
    assert res.exit_code == 1
    (reg,) = [c for c in res.comparisons if c.verdict == "regression"]
    assert reg.metric == "accuracy" and reg.change == pytest.approx(-1.0)
    assert run(tmp_path, cur_kw={"accuracy": {"onnx_int8": 0.847}}).exit_code == 0  # -0.3 pt


def test_normalised_gate_ignores_a_slower_machine_but_catches_a_slower_model(tmp_path):
    slower_machine = {"finetuned": 1.5, "onnx_int8": 1.5}
    assert run(tmp_path, cur_kw={"scale": slower_machine, "cpu": "cpu-B"}).exit_code == 1
    res = run(tmp_path, cur_kw={"scale": slower_machine, "cpu": "cpu-B"}, normalize=True)
    assert res.exit_code == 0, res.render()
    assert any(c.verdict == "reference" for c in res.comparisons) and "CPU differs" in res.render()
    res = run(tmp_path, cur_kw={"scale": {"finetuned": 1.5, "onnx_int8": 1.8}}, normalize=True)  # 1.2x relative
    assert res.verdict == "regression"


def test_unmatched_keys_are_reported(tmp_path):
    res = run(tmp_path, cur_kw={"seqs": (128, 32)})
    assert res.exit_code == 0
    assert "finetuned/torch-cpu/fp32/b1/s32" in res.only_in_current
    assert "only in current" in res.render()
    d = res.to_dict()
    assert d["schema"] == "edgeft.gate/1" and d["exit_code"] == 0 and d["only_in_current"]
    json.dumps(d)


def test_thread_difference_is_noted(tmp_path):
    res = run(tmp_path, cur_kw={"threads": 1, "scale": {"finetuned": 1.25, "onnx_int8": 1.25}})
    assert res.verdict == "regression" and "threads differ" in res.render()


@pytest.mark.parametrize("cur_kw, needle", [
    ({"schema": "edgeft.bench/2"}, "schema"),
    ({"models": {"finetuned": MODELS["finetuned"]}}, "different model sets"),
    ({"eval_sha": "zzz"}, "different data"),
])
def test_bad_pairs_are_exit_2(tmp_path, cur_kw, needle):
    with pytest.raises(EdgeftError) as e:
        run(tmp_path, cur_kw=cur_kw)
    assert e.value.exit_code == 2 and needle in e.value.one_line()


def test_no_common_key_is_exit_2(tmp_path):
    with pytest.raises(EdgeftError, match="no result key in common"):
        run(tmp_path, cur_kw={"seqs": (64,)})


@pytest.mark.parametrize("content, needle", [
    ("", "is empty"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not an edgeft bench report"),
    ('{"schema": "edgeft.bench/1"}', "no 'results' list"),
    ('{"schema": "edgeft.bench/1", "results": [{"key": "k", "model": "m", "status": "ok", "samples_ms": []}]}',
     "no valid raw samples"),
])
def test_corrupt_files_are_exit_2(tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    base = make_report(tmp_path / "base.json")
    with pytest.raises(EdgeftError) as e:
        gate(bad, base, max_latency_regression=0.1, max_accuracy_drop=0.5, normalize=False)
    assert e.value.exit_code == 2 and needle in e.value.one_line() and str(bad) in e.value.one_line()


def test_missing_file(tmp_path):
    with pytest.raises(EdgeftError, match="not found"):
        gate(tmp_path / "nope.json", make_report(tmp_path / "b.json"), max_latency_regression=0.1,
             max_accuracy_drop=0.5, normalize=False)


@pytest.mark.parametrize("text, value", [("10%", 0.1), ("0.1", 0.1), ("0", 0.0), (" 25 % ".strip(), 0.25), ("5.5%", 0.055)])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "10", "-5%", "100%", "nan", ""])
def test_parse_fraction_rejects(text):
    with pytest.raises(EdgeftError):
        parse_fraction(text)


# ---------------------------------------------------------------- probe: NaN, booleans, malformed reports


def test_nan_accuracy_is_bad_input_not_a_pass(tmp_path):
    base = make_report(tmp_path / "base.json")
    cur = make_report(tmp_path / "cur.json", seed=1, accuracy={"onnx_int8": float("nan")})
    assert "NaN" in cur.read_text()
    with pytest.raises(EdgeftError) as e:
        gate(cur, base, max_latency_regression=0.1, max_accuracy_drop=0.5, normalize=False)
    assert e.value.exit_code == 2 and "accuracy nan is not a number in [0, 1]" in e.value.one_line()


@pytest.mark.parametrize("drop", [float("nan"), float("inf"), -1.0])
def test_max_accuracy_drop_must_be_a_finite_number(tmp_path, drop):
    with pytest.raises(EdgeftError, match="max-accuracy-drop"):
        run(tmp_path, cur_kw={"accuracy": {"onnx_int8": 0.32}}, max_accuracy_drop=drop)  # a 53-point drop


def test_cli_max_accuracy_drop_nan_is_exit_2(tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import cli

    base = make_report(tmp_path / "base.json")
    cur = make_report(tmp_path / "cur.json", seed=1, accuracy={"onnx_int8": 0.32})
    r = CliRunner().invoke(cli, ["gate", str(cur), "--baseline", str(base), "--max-accuracy-drop", "nan"])
    assert r.exit_code == 2 and "max-accuracy-drop nan" in r.output


def test_boolean_samples_are_not_milliseconds(tmp_path):
    base = make_report(tmp_path / "base.json")
    data = json.loads(base.read_text())
    data["results"][0]["samples_ms"] = [True] * 600
    bad = tmp_path / "bool.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(EdgeftError, match="not a number \\(bool\\)"):
        gate(bad, base, max_latency_regression=0.1, max_accuracy_drop=0.5, normalize=False)


def _mutate(report: dict, how: str) -> dict:
    r0 = report["results"][0]
    if how == "string samples":
        r0["samples_ms"] = ["1.0"] * 50
    elif how == "result not a dict":
        report["results"][1] = 7
    elif how == "key is a list":
        r0["key"] = ["a", ["b"]]
    elif how == "batch is a string":
        r0["batch"] = "1"
    elif how == "accuracy is a dict":
        r0["accuracy"] = {"x": 1}
    elif how == "environment is a list":
        report["environment"] = [1, 2]
    elif how == "threads is a string":
        report["environment"]["threads"] = "two"
    elif how == "models garbage":
        report["models"] = [{"name": ["x"], "files": 3}]
    elif how == "reference garbage":
        report["reference"] = {"model": 1}
    elif how == "duplicate key":
        report["results"].append(dict(r0))
    elif how == "nested samples":
        r0["samples_ms"] = [[1.0, 2.0]] * 30
    elif how == "deep nesting":
        return "[" * 100000 + "]" * 100000
    return report


@pytest.mark.parametrize("how", ["string samples", "result not a dict", "key is a list", "batch is a string",
                                 "accuracy is a dict", "environment is a list", "threads is a string",
                                 "models garbage", "reference garbage", "duplicate key", "nested samples",
                                 "deep nesting"])
def test_malformed_reports_are_one_line_and_exit_2(tmp_path, how):
    from click.testing import CliRunner

    from edgeft.cli import cli

    base = make_report(tmp_path / "base.json")
    data = _mutate(json.loads(make_report(tmp_path / "cur.json", seed=1).read_text()), how)
    cur = tmp_path / "bad.json"
    cur.write_text(data if isinstance(data, str) else json.dumps(data))
    for args in (["gate", str(cur), "--baseline", str(base)], ["gate", str(base), "--baseline", str(cur)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, (how, r.output)
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
        assert str(cur) in r.output


# ---------------------------------------------------------------- probe: model identity


def test_a_different_checkpoint_under_the_same_name_is_flagged(tmp_path):
    res = run(tmp_path, cur_kw={"files": {"onnx_int8": {"model.onnx": "f" * 64}}})
    assert res.models["onnx_int8"]["same"] is False and res.models["finetuned"]["same"] is True
    assert "DIFFERENT checkpoint under the same name: onnx_int8" in res.render()
    assert res.to_dict()["models"]["onnx_int8"]["same"] is False
    same = run(tmp_path)
    assert "DIFFERENT" not in same.render() and all(m["same"] for m in same.models.values())


def test_expect_same_model_refuses_a_different_checkpoint(tmp_path):
    with pytest.raises(EdgeftError) as e:
        run(tmp_path, cur_kw={"files": {"onnx_int8": {"model.onnx": "f" * 64}}}, expect_same_model=True)
    assert e.value.exit_code == 2 and "onnx_int8" in e.value.one_line() and "sha256 differ" in e.value.one_line()
    assert run(tmp_path, expect_same_model=True).exit_code == 0


# ---------------------------------------------------------------- probe: a 43 MB report took minutes


def test_a_large_report_gates_in_seconds(tmp_path):
    import time

    # 4 keys x 250k samples a side: ~20 MB of JSON; resampling for the bootstrap took minutes
    base = make_report(tmp_path / "base.json", n=250_000, seqs=(128, 32))
    cur = make_report(tmp_path / "cur.json", seed=1, n=250_000, seqs=(128, 32), scale={"onnx_int8": 1.2})
    assert base.stat().st_size > 8e6
    t0 = time.perf_counter()
    res = gate(cur, base, max_latency_regression=0.1, max_accuracy_drop=0.5, normalize=False)
    assert time.perf_counter() - t0 < 20
    assert res.verdict == "regression" and res.count("regression") == 2
