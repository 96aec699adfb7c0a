"""Warm-up and interleaved timing of several variants in one process.

Method (recorded in bench.json under ``method``):

1. Warm-up, one variant at a time, in chunks of 10 calls, until the medians of the last two chunks differ by
   less than 5 % (and at least ``warmup_min_iters`` calls and ``warmup_min_s`` seconds), capped at
   ``warmup_max_s``. Whether it settled is recorded.
2. Rounds. In each round every variant runs one block of calls; blocks are sized to take about the same
   wall time (``block_ms``) so every variant is sampled over the whole measuring period and drift of the
   machine hits all alike. Before each block the process idles ``switch_idle_ms``: an ONNX Runtime
   session's worker threads keep spinning for ~30-40 ms after its last call, and on 2 cores that halves
   the speed of whatever runs next (measured: int8 MiniLM 9.9 ms instead of 5.0 ms for its first five
   calls after another session's block on an Intel Xeon; ``bench/thread_spin.py`` on a 2-core AMD EPYC:
   6.1 vs 3.0 ms, 4.6 ms after a 25 ms idle). The first call of every block is not recorded either: it pays
   for the switch (caches, sleeping pools waking up). The starting variant rotates each round.
3. Stop once every variant holds ``target_samples``, or the budget is spent; past the budget, go on (up to
   twice the budget) only while some variant holds fewer than ``min_samples``.

``perf_counter_ns`` around each call; CUDA callables synchronise inside the call. The garbage collector is
off while measuring.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)
    warmup_iters: int = 0
    warmup_s: float = 0.0
    warmup_settled: bool = False
    block: int = 0
    discarded: int = 0  # switch calls (first of each block), not recorded


@dataclass(frozen=True)
class TimingPlan:
    min_samples: int = 200
    target_samples: int = 1000  # ~p99
    budget_s: float = 60.0  # for all variants together
    block_ms: float = 150.0
    switch_idle_ms: float = 50.0  # > the ~40 ms other runtimes' idle threads keep spinning
    warmup_min_iters: int = 20
    warmup_min_s: float = 0.5
    warmup_max_s: float = 8.0
    settle_tolerance: float = 0.05

    def describe(self) -> dict:
        return {"min_samples": self.min_samples, "target_samples": self.target_samples, "budget_s": self.budget_s,
                "block_ms": self.block_ms, "switch_idle_ms": self.switch_idle_ms, "warmup_min_iters": self.warmup_min_iters,
                "warmup_min_s": self.warmup_min_s, "warmup_max_s": self.warmup_max_s,
                "settle_tolerance": self.settle_tolerance}


def _call_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def warm_up(fn: Callable[[], object], plan: TimingPlan) -> tuple[int, float, bool, float]:
    """Run ``fn`` until chunk medians settle. Returns (calls, seconds, settled, last chunk median ms)."""
    t_start = time.perf_counter()
    calls, prev, settled, med = 0, None, False, float("nan")
    while True:
        chunk = [_call_ms(fn) for _ in range(10)]
        calls += 10
        med = float(np.median(chunk))
        elapsed = time.perf_counter() - t_start
        if prev is not None and abs(med - prev) <= plan.settle_tolerance * prev \
                and calls >= plan.warmup_min_iters and elapsed >= plan.warmup_min_s:
            settled = True
            break
        if elapsed >= plan.warmup_max_s:
            break
        prev = med
    return calls, time.perf_counter() - t_start, settled, med


def measure_interleaved(fns: dict[str, Callable[[], object]], plan: TimingPlan,
                        on_round: Callable[[int, dict[str, int]], None] | None = None,
                        stop: Callable[[dict[str, Timing]], bool] | None = None) -> dict[str, Timing]:
    """Warm up each callable, then time them all round by round (see the module docstring).

    ``stop``, when given, is asked after every round (with the timings so far) and ends the measurement
    when it returns True (a sequential test deciding as it goes: ``edgeft.ab_gate``)."""
    timings: dict[str, Timing] = {}
    names = list(fns)
    if not names:
        return timings
    for name in names:
        calls, secs, settled, med = warm_up(fns[name], plan)
        block = int(min(50, max(2, round(plan.block_ms / max(med, 1e-3)))))
        timings[name] = Timing(warmup_iters=calls, warmup_s=secs, warmup_settled=settled, block=block)

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        t_start = time.perf_counter()
        rnd = 0
        while True:
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                t, fn = timings[name], fns[name]
                time.sleep(plan.switch_idle_ms / 1000)  # let the previous variant's threads stop spinning
                fn()  # switch call: not recorded
                t.discarded += 1
                t.samples_ms.extend(_call_ms(fn) for _ in range(t.block))
            rnd += 1
            counts = {n: len(timings[n].samples_ms) for n in names}
            if on_round is not None:
                on_round(rnd, counts)
            if stop is not None and stop(timings):
                break
            elapsed = time.perf_counter() - t_start
            least = min(counts.values())
            if least >= plan.target_samples and least >= plan.min_samples:
                break
            if elapsed >= plan.budget_s and (least >= plan.min_samples or elapsed >= 2 * plan.budget_s):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings
