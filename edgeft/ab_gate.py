"""In-run A/B latency gate: the baseline and the candidate model timed interleaved in one process.

Why: a baseline stored as numbers from another time cannot beat the 15-35 % drift of a shared CI VM;
timing both models in the same process, alternating, makes drift hit both alike, and the paired ratio
cancels it.

Method
------
1. Each side (a run folder, a bundle folder from ``edgeft ship``, a Hugging Face folder or an ``.onnx``
   file) resolves to one model (:func:`resolve_model`); a run folder stands for the variant ``edgeft ship``
   would ship (or ``variant``), a bundle for its checksum-verified ``model/model.onnx``.
2. Both are loaded with the same intra-op thread count (unless ``baseline_threads`` / ``candidate_threads``
   set one side), given the same synthetic batch (``edgeft.bench.core.synthetic_batch``: exactly ``seq``
   tokens) and timed with the bench's method (``edgeft.bench.timing.measure_interleaved``: per-model
   warm-up, then rounds of one ~150 ms block per model, a 50 ms idle before each block, the starting model
   alternating). The garbage collector is off while timing.
3. Two consecutive rounds (baseline-candidate, then candidate-baseline: order effects cancel) make one
   *pair*. Per pair: ``r = median(candidate's samples) / median(baseline's samples)``. The gate decides
   on the mean of ``log r`` over the pairs with a Student-t confidence interval (the pairs' ratios are
   roughly log-normal; the interval on the log scale becomes a ratio interval).

Sequential test and its error rate
----------------------------------
The interval is computed at *looks*, not after every pair: the first look after ``min_rounds`` rounds
(no decision before), then each time the number of pairs has grown by half (10, 15, 23, 35, ... pairs),
and once more when the budget is spent. Checking a fixed 95 % interval at every look would inflate the
error rate (with 10 looks, to well over 5 %); instead the error is *spent*: look ``j`` uses a two-sided
interval at confidence ``1 - alpha / (j (j + 1))``, and since ``sum_j alpha / (j (j + 1)) = alpha``, the
probability that any look's interval misses the true ratio is at most ``alpha`` (0.05 by default) whatever
the number of looks (a union bound; it needs no independence between looks). So a model exactly at the
threshold is called a REGRESSION (or a PASS) wrongly at most ``alpha`` of the time (``alpha / 2`` each),
and a model well inside is practically never called a regression. ``tests/unit/test_ab_gate.py``
simulates this.

Decision, with ``T = 1 + max_latency_regression``:

- PASS when the interval's upper end < T;
- REGRESSION when its lower end > T (the whole interval beyond the threshold: whatever the CV);
- INCONCLUSIVE only when the budget (``budget_s``: warm-up and timing, loading excluded) runs out first;
  the result says how wide the interval got and about how many pairs (and seconds) would have resolved it.

Exit codes as the stored-baseline gate: 0 pass, 1 regression or inconclusive, 2 bad input. With ``data``
both models' accuracy is also measured on the same texts; a drop beyond ``max_accuracy_drop`` points fails.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError, ModelError

AB_SCHEMA = "edgeft.ab-gate/1"
DEFAULT_BUDGET_S = 30.0
DEFAULT_ALPHA = 0.05
DEFAULT_MIN_ROUNDS = 20  # = 10 pairs
LOOK_GROWTH = 1.5
RUNTIME_FOR = {"hf": "torch-cpu", "onnx": "ort-cpu"}


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class ABConfig:
    """Every ``edgeft gate --baseline-model`` option is a field here."""

    baseline: Path
    candidate: Path
    max_latency_regression: float = 0.10
    budget_s: float = DEFAULT_BUDGET_S
    threads: int | None = None  # both sides; default: usable cores
    baseline_threads: int | None = None
    candidate_threads: int | None = None
    batch: int = 1
    seq: int = 128
    variant: str | None = None  # for run folders: the variant to take (default: the one ship would ship)
    min_rounds: int = DEFAULT_MIN_ROUNDS
    alpha: float = DEFAULT_ALPHA
    data: str | None = None  # DATASET[:SPLIT] for the optional accuracy comparison
    max_eval_samples: int = 500
    max_accuracy_drop: float = 0.5
    show_progress: bool = False

    def __post_init__(self) -> None:
        thr = self.max_latency_regression
        if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not math.isfinite(thr) or not 0 <= thr < 1:
            raise EdgeftError(f"max latency regression {thr!r} is not a fraction in [0, 1)", "write it like 10%")
        if not math.isfinite(self.budget_s) or not 0 < self.budget_s <= 3600:
            raise EdgeftError(f"--budget-seconds {self.budget_s} is out of range", "give seconds in (0, 3600], e.g. 30")
        for name in ("threads", "baseline_threads", "candidate_threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise EdgeftError(f"--{name.replace('_', '-')} {v} is not a positive integer", "give 1 or more threads")
        if self.batch < 1 or self.seq < 2:
            raise EdgeftError(f"batch {self.batch} / seq {self.seq} out of range", "give --batch >= 1 and --seq >= 2")
        if self.min_rounds < 4:
            raise EdgeftError(f"--min-rounds {self.min_rounds} is too small", "give at least 4 rounds")
        if not 0 < self.alpha < 0.5:
            raise EdgeftError(f"alpha {self.alpha} out of range", "give a value in (0, 0.5), e.g. 0.05")
        if not math.isfinite(self.max_accuracy_drop) or self.max_accuracy_drop < 0:
            raise EdgeftError(f"--max-accuracy-drop {self.max_accuracy_drop} is not a number of points >= 0",
                              "give points, e.g. 0.5")
        if self.max_eval_samples < 1:
            raise EdgeftError(f"--max-eval-samples {self.max_eval_samples} must be positive", "give e.g. 500")


# ---------------------------------------------------------------- statistics (numpy + math only)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t distribution function."""
    tail = 0.5 * _betai(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """Inverse of :func:`t_cdf` for 0.5 <= q < 1 (bisection; exact to ~1e-10)."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2
        if hi > 1e8:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


def look_alpha(look: int, alpha: float) -> float:
    """Error spent at look ``look`` (1-based): ``alpha / (look (look + 1))``; the sum over looks is ``alpha``."""
    return alpha / (look * (look + 1))


def next_look(pairs: int) -> int:
    return max(pairs + 1, math.ceil(pairs * LOOK_GROWTH))


@dataclass
class Interval:
    pairs: int
    look: int
    confidence: float
    ratio: float  # exp(mean log ratio)
    lo: float
    hi: float
    sd_log: float
    t: float

    @property
    def width(self) -> float:
        return self.hi - self.lo


def paired_interval(log_ratios, look: int, alpha: float) -> Interval:
    """t-interval of the mean log ratio at look ``look`` (its confidence from :func:`look_alpha`)."""
    x = np.asarray(log_ratios, dtype=np.float64)
    k = x.size
    if k < 2:
        raise ValueError("need at least two pairs")
    a = look_alpha(look, alpha)
    m = float(x.mean())
    sd = float(x.std(ddof=1))
    t = t_quantile(1 - a / 2, k - 1)
    half = t * sd / math.sqrt(k)
    return Interval(pairs=k, look=look, confidence=1 - a, ratio=math.exp(m), lo=math.exp(m - half),
                    hi=math.exp(m + half), sd_log=sd, t=t)


def classify(iv: Interval, threshold: float) -> str | None:
    """``pass`` / ``regression`` when the interval resolves ``1 + threshold``, else None."""
    limit = 1 + threshold
    if iv.hi < limit:
        return "pass"
    if iv.lo > limit:
        return "regression"
    return None


def pairs_needed(iv: Interval, threshold: float) -> int | None:
    """About how many pairs a t-interval at this confidence needs to put ``1 + threshold`` outside it
    (same spread and mean); None when the estimate sits on the threshold."""
    d = abs(math.log(iv.ratio) - math.log1p(threshold))
    if d < 1e-12:
        return None
    return max(iv.pairs + 1, math.ceil((iv.t * iv.sd_log / d) ** 2))


def sequential_decision(log_ratios, threshold: float, *, min_pairs: int, alpha: float,
                        final: bool = True) -> tuple[str, Interval | None, int]:
    """Replay the sequential test over ``log_ratios`` (one per pair): (verdict, last interval, looks).
    ``final``: the end of the list is the end of the budget (one more look there)."""
    x = list(log_ratios)
    look, want, iv = 0, min_pairs, None
    for k in range(1, len(x) + 1):
        if k == want or (final and k == len(x) and k >= max(2, min_pairs)):
            look += 1
            iv = paired_interval(x[:k], look, alpha)
            verdict = classify(iv, threshold)
            if verdict:
                return verdict, iv, look
            if k == want:
                want = next_look(k)
    return "inconclusive", iv, look


# ---------------------------------------------------------------- models


@dataclass
class Side:
    role: str  # baseline | candidate
    given: str  # the path as given
    kind: str  # run | bundle | hf | onnx
    spec: object  # edgeft.bench.models.ModelSpec
    identity: str  # sha256 over the model's files
    runtime: str
    threads: int

    def describe(self) -> dict:
        s = self.spec
        return {"role": self.role, "path": self.given, "kind": self.kind, "model": s.name, "format": s.format,
                "file": str(s.path), "precision": s.precision, "runtime": self.runtime, "threads": self.threads,
                "identity": self.identity, "size_mb": round(s.size_mb, 3)}


def model_identity(files) -> str:
    """sha256 over the sorted (file name, file sha256) pairs of a model: the same bytes, the same identity."""
    from edgeft.artifacts import sha256_file

    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: Path(p).name):
        h.update(f"{Path(f).name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def resolve_model(path: str | Path, *, variant: str | None = None, role: str = "model"):
    """One model for ``path``: returns (kind, ModelSpec). See the module docstring."""
    from edgeft.artifacts import is_run_dir
    from edgeft.bench.models import COMPRESS_REPORT, discover, onnx_spec
    from edgeft.bundle import MANIFEST, open_bundle
    from edgeft.finetune import FINETUNED

    p = Path(path)
    if not p.exists():
        raise ModelError(f"{role} {p} not found",
                         "pass a run folder, a bundle folder from 'edgeft ship', a Hugging Face folder or an .onnx file")
    if p.is_dir() and (p / MANIFEST).is_file() and not is_run_dir(p):
        b = open_bundle(p)  # refuses a bundle whose checksums do not match
        spec = onnx_spec(b.onnx_path, f"{b.name}:{b.version}", str(p))
        if spec.max_length is None:
            spec.max_length = b.max_length
        return "bundle", spec
    if p.is_dir() and is_run_dir(p):
        if (p / COMPRESS_REPORT).is_file() and variant not in ("finetuned", "pruned"):
            from edgeft.ship import ShipConfig, _read_json, choose_variant

            report = _read_json(p / COMPRESS_REPORT, "the compress report", "re-run 'edgeft compress'")
            bench = None
            if (p / "bench.json").is_file():
                try:
                    bench = _read_json(p / "bench.json", "a bench report", "re-run 'edgeft bench'")
                except EdgeftError:
                    bench = None
            v = choose_variant(p, report, bench, ShipConfig(run_dir=p, variant=variant, allow_miss=True))
            return "run", onnx_spec(v.onnx, v.name, str(p), tokenizer_fallback=p / FINETUNED, precision=v.precision)
        specs = discover([p])
        wanted = variant or FINETUNED
        spec = next((s for s in specs if s.name == wanted), None)
        if spec is None:
            raise ModelError(f"{role} run folder {p} has no variant '{wanted}'",
                             f"choose one of: {', '.join(s.name for s in specs)}")
        return "run", spec
    specs = discover([p])
    if len(specs) != 1:  # pragma: no cover - discover gives one spec for anything but a run folder
        raise ModelError(f"{role} {p} stands for {len(specs)} models", "pass one model")
    return specs[0].format, specs[0]


# ---------------------------------------------------------------- result


@dataclass
class ABResult:
    verdict: str  # pass | regression | inconclusive
    threshold: float
    sides: list[dict]
    interval: dict | None
    latency_verdict: str
    rounds: int
    pairs: int
    looks: int
    measure_s: float
    wall_s: float
    budget_s: float
    alpha: float
    per_side: dict = field(default_factory=dict)  # role -> {p50_ms, cv_robust, n}
    needed: dict | None = None
    accuracy: dict | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    pair_ratios: list[float] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "pass" else 1

    def render(self) -> str:
        head = {"pass": "PASS", "regression": "REGRESSION", "inconclusive": "INCONCLUSIVE (not a pass)"}[self.verdict]
        limit = 1 + self.threshold
        iv = self.interval
        if iv:
            what = (f"candidate/baseline latency {iv['ratio']:.3f}x ({iv['ratio'] - 1:+.1%}), "
                    f"{iv['confidence']:.2%} CI {iv['lo']:.3f}..{iv['hi']:.3f} vs limit {limit:.3f}")
        else:
            what = "no interval (too few rounds in the budget)"
        lines = [f"gate (A/B, interleaved in one process): {head}: {what}; {self.rounds} rounds "
                 f"({self.pairs} pairs, {self.looks} looks) in {self.measure_s:.1f}s of {self.budget_s:.0f}s budget"]
        for s in self.sides:
            ps = self.per_side.get(s["role"], {})
            lines.append(f"  {s['role']:<9} {s['path']} -> {s['model']} ({s['runtime']} {s['precision']}, "
                         f"{s['threads']} threads): p50 {ps.get('p50_ms', float('nan')):.4g} ms, robust CV "
                         f"{ps.get('cv_robust', float('nan')):.1%}, n {ps.get('n', 0)}")
        if self.latency_verdict == "inconclusive" and iv:
            lines.append(f"  latency INCONCLUSIVE: the CI is {iv['hi'] - iv['lo']:.3f} wide and still holds {limit:.3f}")
        if self.needed:
            n = self.needed
            if n.get("pairs") is None:
                lines.append("  the ratio sits on the threshold: no affordable budget resolves it")
            else:
                lines.append(f"  resolving it would need about {n['pairs']} pairs ({n['rounds']} rounds, ~{n['samples_per_side']} "
                             f"samples per side, ~{n['seconds']:.0f}s "
                             f"of timing): re-run with --budget-seconds {math.ceil(n['budget_s'])} or on a quieter machine")
        if self.accuracy:
            a = self.accuracy
            lines.append(f"  accuracy {a['baseline']:.4f} -> {a['candidate']:.4f} ({a['change_points']:+.2f} pt, "
                         f"limit -{a['max_drop_points']} pt, {a['n']} {a['split']} texts): {a['verdict']}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.verdict == "inconclusive":
            lines.append("  inconclusive fails the gate (exit 1)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"schema": AB_SCHEMA, "exit_code": self.exit_code, **d}


# ---------------------------------------------------------------- the gate


class _Sequential:
    """The ``stop`` callback of measure_interleaved: pairs rounds, looks, decides (see the docstring)."""

    def __init__(self, names: tuple[str, str], cfg: ABConfig, deadline: float):
        self.base, self.cand = names
        self.cfg, self.deadline = cfg, deadline
        self.bounds: list[dict[str, int]] = []
        self.logs: list[float] = []
        self.min_pairs = self.want = max(2, cfg.min_rounds // 2)
        self.look = 0
        self.interval: Interval | None = None
        self.verdict: str | None = None
        self.t_first: float | None = None

    def __call__(self, timings) -> bool:
        # Called after every round; the budget is checked only when a pair is complete (at most one more
        # round), so the last look always sees whole pairs.
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.bounds.append({n: len(timings[n].samples_ms) for n in (self.base, self.cand)})
        if len(self.bounds) % 2 == 0:
            start = self.bounds[-3] if len(self.bounds) > 2 else {self.base: 0, self.cand: 0}
            end = self.bounds[-1]
            b = np.median(timings[self.base].samples_ms[start[self.base]:end[self.base]])
            c = np.median(timings[self.cand].samples_ms[start[self.cand]:end[self.cand]])
            self.logs.append(math.log(max(c, 1e-9) / max(b, 1e-9)))
            k = len(self.logs)
            out_of_time = time.perf_counter() >= self.deadline
            if k == self.want or (out_of_time and k >= self.min_pairs):
                self.look += 1
                self.interval = paired_interval(self.logs, self.look, self.cfg.alpha)
                self.verdict = classify(self.interval, self.cfg.max_latency_regression)
                if self.verdict:
                    return True
                if k == self.want:
                    self.want = next_look(k)
            if out_of_time:
                return True
        return False


def _threaded(fn, n: int):
    """A torch callable that runs at ``n`` intra-op threads (torch's count is per process: switch per call)."""
    import torch

    def call():
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return fn()

    return call


def _accuracy(cfg: ABConfig, loaded: list, show: bool) -> dict:
    from edgeft.bench.core import DEFAULT_MAX_LENGTH, _predict
    from edgeft.data import load_dataset, stratified_subsample
    from edgeft.metrics import classification_metrics
    from edgeft.recipe import DataConfig

    name, _, split = cfg.data.rpartition(":")
    if split not in ("validation", "test") or not name:
        name, split = cfg.data, "test"  # no split named: the test split
    ds = load_dataset(DataConfig(dataset=name))
    part = stratified_subsample(ds.split(split), cfg.max_eval_samples, seed=0)
    labels = np.asarray(part.labels)
    acc = {}
    for role, v in loaded:
        names = v.spec.label_names
        if names is not None and list(names) != list(ds.label_names):
            raise EdgeftError(f"{role} model labels {names} differ from the dataset's {ds.label_names}",
                              "give the --data the models were trained on")
        logits = _predict(v, part.texts, v.spec.max_length or DEFAULT_MAX_LENGTH)
        if logits.shape[-1] != ds.num_labels:
            raise EdgeftError(f"{role} model has {logits.shape[-1]} outputs, the dataset {ds.num_labels} labels",
                              "give the --data the models were trained on")
        acc[role] = classification_metrics(labels, logits.argmax(-1), ds.label_names)["accuracy"]
    change = (acc["candidate"] - acc["baseline"]) * 100
    return {"dataset": name, "split": split, "n": len(part), "sha256": part.sha256(), "baseline": acc["baseline"],
            "candidate": acc["candidate"], "change_points": change, "max_drop_points": cfg.max_accuracy_drop,
            "verdict": "regression" if -change > cfg.max_accuracy_drop + 1e-9 else "ok"}


def ab_gate(cfg: ABConfig) -> ABResult:
    """Bench ``cfg.baseline`` and ``cfg.candidate`` interleaved and decide (see the module docstring)."""
    from edgeft.artifacts import cpu_info
    from edgeft.bench.core import Variant, _load_tokenizer, _max_positions, synthetic_batch, usable_cores
    from edgeft.bench.runtimes import load_engine, set_torch_threads
    from edgeft.bench.stats import robust_cv
    from edgeft.bench.timing import TimingPlan, measure_interleaved
    from edgeft.progress import say

    t_wall = time.perf_counter()
    show = cfg.show_progress
    both = cfg.threads or usable_cores()
    sides: list[Side] = []
    for role, path, thr in (("baseline", cfg.baseline, cfg.baseline_threads),
                            ("candidate", cfg.candidate, cfg.candidate_threads)):
        kind, spec = resolve_model(path, variant=cfg.variant, role=role)
        sides.append(Side(role, str(path), kind, spec, model_identity(spec.files), RUNTIME_FOR[spec.format],
                          thr or both))
    if any(s.spec.format == "hf" for s in sides):
        set_torch_threads(max(s.threads for s in sides))

    tok_cache: dict = {}
    loaded = []
    seq = cfg.seq
    for s in sides:
        mp = _max_positions(s.spec)
        if mp:
            seq = min(seq, mp)
    fns = {}
    for s in sides:
        say(f"[bold]load[/] {s.role}: {s.spec.name} ({s.runtime}, {s.threads} threads)", enabled=show)
        tok = _load_tokenizer(s.spec.tokenizer_dir, tok_cache)
        engine, _ = load_engine(s.spec.format, s.spec.path, s.runtime, s.spec.precision, s.threads)
        v = Variant(s.spec, s.runtime, s.spec.precision, engine=engine, tokenizer=tok)
        loaded.append((s.role, v))
        prepared = engine.prepare(synthetic_batch(tok, cfg.batch, seq))
        fn = (lambda e=engine, p=prepared: e.run(p))
        fns[s.role] = _threaded(fn, s.threads) if s.spec.format == "hf" else fn

    accuracy = _accuracy(cfg, loaded, show) if cfg.data else None

    warm_max = min(4.0, max(0.5, cfg.budget_s / 8))
    plan = TimingPlan(min_samples=1, target_samples=10**9, budget_s=cfg.budget_s * 2, warmup_min_s=min(0.5, warm_max),
                      warmup_max_s=warm_max, warmup_min_iters=20)
    t0 = time.perf_counter()
    seqtest = _Sequential(("baseline", "candidate"), cfg, deadline=t0 + cfg.budget_s)
    say(f"[bold]timing[/] b{cfg.batch} s{seq} interleaved, budget {cfg.budget_s:.0f}s", enabled=show)
    timings = measure_interleaved(fns, plan, stop=seqtest)
    measure_s = time.perf_counter() - t0
    timing_s = time.perf_counter() - (seqtest.t_first or t0)

    iv = seqtest.interval
    lat = seqtest.verdict or "inconclusive"
    needed = None
    pairs = len(seqtest.logs)
    if lat == "inconclusive" and iv is not None:
        n = pairs_needed(iv, cfg.max_latency_regression)
        per_pair = timing_s / max(pairs, 1)
        warm = measure_s - timing_s
        per_pair_samples = min(len(t.samples_ms) for t in timings.values()) / max(pairs, 1)
        needed = {"pairs": n, "rounds": None if n is None else 2 * n,
                  "samples_per_side": None if n is None else math.ceil(n * per_pair_samples),
                  "seconds": None if n is None else n * per_pair,
                  "budget_s": None if n is None else n * per_pair + warm,
                  "ci_width": iv.width}
    per_side = {}
    for role, t in timings.items():
        arr = np.asarray(t.samples_ms)
        per_side[role] = {"p50_ms": float(np.median(arr)) if arr.size else float("nan"),
                          "cv_robust": robust_cv(arr) if arr.size > 1 else float("nan"), "n": int(arr.size),
                          "warmup_settled": t.warmup_settled, "block": t.block}
    notes = []
    if sides[0].identity == sides[1].identity:
        notes.append("baseline and candidate are the same model files (identical checkpoints)")
    if sides[0].threads != sides[1].threads:
        notes.append(f"thread counts differ: baseline {sides[0].threads}, candidate {sides[1].threads}")
    if iv is None:
        notes.append(f"the budget ran out before the first look ({cfg.min_rounds} rounds): raise --budget-seconds")
    verdict = "regression" if lat == "regression" or (accuracy and accuracy["verdict"] == "regression") else lat
    cpu = cpu_info()
    return ABResult(
        verdict=verdict, threshold=cfg.max_latency_regression, sides=[s.describe() for s in sides],
        interval=asdict(iv) | {"width": iv.width} if iv else None, latency_verdict=lat,
        rounds=len(seqtest.bounds), pairs=pairs, looks=seqtest.look, measure_s=round(measure_s, 2),
        wall_s=round(time.perf_counter() - t_wall, 2), budget_s=cfg.budget_s, alpha=cfg.alpha, per_side=per_side,
        needed=needed, accuracy=accuracy, notes=notes,
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()} | {"seq_used": seq,
                                                                                              "plan": plan.describe()},
        environment={"cpu": cpu}, pair_ratios=[round(math.exp(x), 5) for x in seqtest.logs])
