"""The gate on synthetic reports: shifts it must catch, noise it must ignore, bad input it must refuse."""

import json

import numpy as np
import pytest

from edgeft.errors import EdgeftError
from edgeft.gate import gate, parse_fraction

MODELS = {"finetuned": ("torch-cpu", "fp32", 30.0), "onnx_int8": ("ort-cpu", "int8", 9.0)}


def make_report(path, *, seed=0, scale=None, sigma=0.03, n=600, accuracy=None, models=MODELS,
                schema="edgeft.bench/1", eval_sha="abc", threads=2, cpu="cpu-A", seqs=(128,)):
    """A bench.json with lognormal samples; ``scale`` multiplies a model's latency."""
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
    report = {"schema": schema, "environment": {"threads": {"intra_op": threads}, "cpu": {"model": cpu}},
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


def test_ci_wider_than_threshold_is_inconclusive(tmp_path):
    res = run(tmp_path, cur_kw={"sigma": 0.15, "n": 40}, base_kw={"sigma": 0.15, "n": 40})
    assert res.verdict == "inconclusive" and "too noisy to resolve" in res.render()


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
