"""Statistics on raw latency samples: summaries, bootstrap CI of a median ratio, rank test."""

import numpy as np
import pytest

from edgeft.bench import stats


def lognormal(median, sigma, n, seed):
    return median * np.random.default_rng(seed).lognormal(0.0, sigma, n)


def test_summarize_known_values():
    s = stats.summarize(np.arange(1, 101, dtype=float))
    assert s["n"] == 100 and s["p50"] == pytest.approx(50.5) and s["mean"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert s["stdev"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert s["cv"] == pytest.approx(s["stdev"] / s["mean"])
    assert s["min"] == 1 and s["max"] == 100 and s["iqr"] == pytest.approx(49.5)
    assert not s["is_p99_reliable"]
    assert stats.summarize([])["n"] == 0
    assert stats.summarize([3.0])["stdev"] == 0.0


def test_spikes_raise_cv_not_robust_cv_and_are_flagged_not_dropped():
    x = lognormal(10.0, 0.02, 1000, 0)
    x[::100] = 200.0  # ten scheduler spikes
    s = stats.summarize(x)
    assert s["n"] == 1000 and s["max"] == 200.0
    assert s["cv"] > 0.5 and s["cv_robust"] < 0.05
    assert s["outliers"] == 10 and not s["is_unstable"]
    assert stats.summarize(lognormal(10.0, 0.3, 500, 1))["is_unstable"]


def test_nan_rejected():
    with pytest.raises(ValueError):
        stats.summarize([1.0, float("nan")])


def test_bootstrap_ci_catches_a_shift_and_covers_no_shift():
    base = lognormal(10.0, 0.05, 800, 1)
    slow = lognormal(12.0, 0.05, 800, 2)
    point, lo, hi = stats.bootstrap_ratio_ci(base, slow)
    assert point == pytest.approx(1.2, rel=0.02) and 1.15 < lo < 1.2 < hi < 1.25
    point, lo, hi = stats.bootstrap_ratio_ci(base, lognormal(10.0, 0.05, 800, 3))
    assert lo < 1.0 < hi and hi - lo < 0.02


def test_bootstrap_normalised_cancels_a_slower_machine():
    base, base_ref = lognormal(10, 0.03, 400, 1), lognormal(30, 0.03, 400, 2)
    cur, cur_ref = lognormal(15, 0.03, 400, 3), lognormal(45, 0.03, 400, 4)  # everything 1.5x slower
    point, lo, hi = stats.bootstrap_ratio_ci(base, cur, base_ref=base_ref, current_ref=cur_ref)
    assert lo < 1.0 < hi and point == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError):
        stats.bootstrap_ratio_ci(base, cur, base_ref=base_ref)


def test_bootstrap_is_seeded():
    a, b = lognormal(10, 0.1, 100, 1), lognormal(11, 0.1, 100, 2)
    assert stats.bootstrap_ratio_ci(a, b, seed=3) == stats.bootstrap_ratio_ci(a, b, seed=3)


def test_mann_whitney_shift_and_noise():
    base = lognormal(10, 0.05, 300, 1)
    assert stats.mann_whitney(base, lognormal(11, 0.05, 300, 2))["p_value"] < 1e-10
    assert stats.mann_whitney(base, lognormal(10, 0.05, 300, 3))["p_value"] > 0.01
    faster = stats.mann_whitney(base, lognormal(9, 0.05, 300, 4))
    assert faster["p_value"] > 0.99 and faster["prob_slower"] < 0.1


def test_mann_whitney_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    a = np.round(rng.normal(10, 1, 120), 1)  # rounding makes ties
    b = np.round(rng.normal(10.3, 1, 90), 1)
    ours = stats.mann_whitney(a, b)
    ref = scipy_stats.mannwhitneyu(b, a, alternative="greater", method="asymptotic", use_continuity=True)
    assert ours["u"] == pytest.approx(ref.statistic)
    assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)


def test_all_equal_samples():
    assert stats.mann_whitney([1.0] * 30, [1.0] * 30)["p_value"] == pytest.approx(0.5)
    assert stats.summarize([2.0] * 10)["outliers"] == 0


def test_interleaved_timing_plan():
    import time

    from edgeft.bench.timing import TimingPlan, measure_interleaved

    calls = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    plan = TimingPlan(min_samples=30, target_samples=60, budget_s=5.0, block_ms=4.0,
                      switch_idle_ms=0.5, warmup_min_iters=10,
                      warmup_min_s=0.0, warmup_max_s=0.2)
    t = measure_interleaved({"fast": make("fast", 0.0005), "slow": make("slow", 0.002)}, plan)
    assert min(len(x.samples_ms) for x in t.values()) >= 60  # stopped at the target, well before the budget
    assert t["fast"].block > t["slow"].block >= 2  # blocks take about the same time
    assert t["fast"].discarded == t["slow"].discarded  # one switch call per block, every round
    assert all(s >= 0.4 for s in t["slow"].samples_ms)
    # interleaved: after warm-up, the two alternate block by block
    measured = calls[-(t["fast"].discarded * 2):]
    assert measured.count("fast") > 0 and "slow" in measured[:len(measured) // 2]
    # the budget wins over the target, but not over min_samples
    plan = TimingPlan(min_samples=5, target_samples=10_000, budget_s=0.2, block_ms=2.0,
                      switch_idle_ms=0.5, warmup_min_iters=10,
                      warmup_min_s=0.0, warmup_max_s=0.1)
    t0 = time.perf_counter()
    t = measure_interleaved({"a": make("a", 0.001)}, plan)
    assert time.perf_counter() - t0 < 2.0 and 5 <= len(t["a"].samples_ms) < 10_000
