"""Stored-baseline gate: compare a bench.json against a stored baseline, on the raw samples.

For CI prefer the A/B gate (``edgeft.ab_gate``: both models timed interleaved in one process): numbers
stored at another time carry the machine's drift (15-35 % on shared VMs), which no interval can remove.
This mode is for when the old model cannot be run any more.

Per result key present (status ok) in both reports:

- latency: ratio = median(current) / median(baseline) with a 95 % bootstrap CI (and a one-sided Mann-Whitney
  rank test, reported). With ``normalize`` each side is first divided by the in-run reference model's latency
  at the same batch/seq, so a baseline taken on one machine still gates on another. With ``T = 1 + threshold``:
  * ``regression``: the whole CI beyond T (its lower end > T), whatever the CV;
  * ``inconclusive``: too few samples; either side grossly unstable (robust CV > ``max_cv``, 25 %) unless the
    CI is wholly beyond T; or the CI holds T (the noise cannot tell the shift from the threshold). The output
    says what would have resolved it (samples per side and seconds of timing, or a quieter machine);
  * ``improvement``: ratio < 1 / T and the CI's upper end < 1;
  * ``ok`` otherwise (the CI wholly below T).
- accuracy (once per model/runtime/precision): a drop of more than ``max_accuracy_drop`` points is a regression.
- model identity: each model's files (sha256 in the report's ``models``) are compared; a different checkpoint
  under the same name is flagged in the output, and refused (exit 2) with ``expect_same_model``.

Decoder bench reports (schema ``edgeft.decoder-bench/2``, from ``edgeft run`` on a text-generation recipe) are
gated per (variant, threads) row present in both, with the same verdicts and rules:

- decode latency per token and time to first token: the unit is the *round* (each round is one greedy generation
  per variant, the variants interleaved). A round's steps share its machine state (and its fresh session), so its
  new_tokens - 1 step latencies are not independent samples: pooled, they would give a CI ~sqrt(steps) too
  narrow for the round-to-round drift (10-25 % on shared VMs) and raise false alarms. Per round the median step
  latency (robust to a scheduler spike) and the time to first token; ratio = the Hodges-Lehmann shift of the
  rounds' log values (the median of all current/baseline round ratios) with its distribution-free 95 % interval
  (Mann-Whitney inverted: exact for few rounds, where a bootstrap is too narrow, and one round stalled by a
  neighbour does not widen it the way it widens a t-interval). With ``normalize`` each round's value
  is first divided by the in-run reference variant's in the same round (which cancels most drift, within a run
  and between runs). ``unstable`` / ``noisy`` come from the robust CV of the pooled decode steps, as for
  classification samples (time to first token, one value per round: the interval alone decides). Fewer than
  ``MIN_ROUNDS`` rounds a side is inconclusive; an interval holding the threshold says how many rounds would
  resolve it (``--set bench.repeats=N``).
- perplexity (once per variant, on the same test tokens only: their sha256): a relative increase beyond
  ``max_perplexity_increase`` (default 2 %) is a regression.
- model identity (``models``: each variant's files' sha256), flagged or refused as above; the prompt and number
  of new tokens must match (other lengths time other work: exit 2).

A classification report gated against a decoder report, a decoder report of schema ``/1`` (medians only) or a
threshold of the other kind (``max_accuracy_drop`` for decoders, ``max_perplexity_increase`` for
classification) is bad input.

Exit code: 0 only when nothing regressed and nothing is inconclusive; 1 for a regression and also for an
inconclusive comparison (never a silent pass: the output says INCONCLUSIVE and why). Bad input (missing,
empty, corrupt or malformed file, NaN accuracy, other schema version, other model set, no key in common,
different evaluation data) raises ``EdgeftError``: exit 2.

Cost: linear in the samples (one pass to check them, one sort per side for the bootstrap).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError

SCHEMA = "edgeft.bench/1"  # same as edgeft.bench.SCHEMA (kept here so the gate does not import the bench)
DECODER_SCHEMA = "edgeft.decoder-bench/2"  # same as edgeft.decoder.pipeline.BENCH_SCHEMA
GATE_SCHEMA = "edgeft.gate/1"
MIN_SAMPLES = 20
MIN_ROUNDS = 4  # decoder rounds per side: 3 v 3 allow no 95 % rank interval (1 / C(6, 3) = 5 % > 2.5 %)
MAX_BENCH_REPEATS = 100  # the decoder recipe's bench.repeats limit (edgeft.decoder.recipe)
DEFAULT_MAX_ACCURACY_DROP = 0.5  # points (classification reports)
DEFAULT_MAX_PERPLEXITY_INCREASE = 0.02  # relative (decoder reports): compress's default goal
MAX_CV = 0.25  # robust CV beyond which the bulk of a run is too spread for its median to mean much
NOISY_CV = 0.10  # STYLE.md's "unstable" mark: reported, and decisive only when the CI cannot resolve the threshold
CONFIDENCE = 0.95


def parse_fraction(text: str | float) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1. Values must lie in [0, 1) as fractions (percent up to 100 %)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise EdgeftError(f"'{text}' is not a fraction", "write it like 10% or 0.1") from None
    if not math.isfinite(value) or value < 0 or value >= 1:
        raise EdgeftError(f"'{text}' is out of range: a fraction in [0, 1) was expected",
                          "write it like 10% or 0.1 (10 means nothing: use 10%)")
    return value


def _number(x) -> bool:
    return type(x) in (int, float)  # not bool (True is an int), not strings


def _check_samples(s, where: str, bad) -> np.ndarray:
    if not isinstance(s, list) or not s:
        bad(f"{where} has no valid raw samples (no samples_ms list)")
    if not all(type(x) in (int, float) for x in s):
        odd = next(x for x in s if type(x) not in (int, float))
        bad(f"{where} has no valid raw samples: a sample is not a number ({type(odd).__name__})")
    arr = np.asarray(s, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        bad(f"{where} has no valid raw samples: NaN, infinite or negative values")
    return arr


def _read_report(path: Path, role: str) -> tuple[Path, dict]:
    """The parsed JSON of a bench.json (or of a folder's bench.json) that has a ``schema`` field."""
    path = Path(path)
    if path.is_dir() and (path / "bench.json").is_file():
        path = path / "bench.json"
    if not path.is_file():
        raise EdgeftError(f"{role} {path} not found", "pass the bench.json written by 'edgeft bench'")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeftError(f"{role} {path} cannot be read ({type(e).__name__})", "pass a bench.json") from None
    if not text.strip():
        raise EdgeftError(f"{role} {path} is empty", "re-run 'edgeft bench' to write it")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        msg = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise EdgeftError(f"{role} {path} is not valid JSON ({msg})",
                          "re-run 'edgeft bench'; the file is truncated or corrupt") from None
    if not isinstance(data, dict) or "schema" not in data:
        raise EdgeftError(f"{role} {path} is not an edgeft bench report (no 'schema' field)",
                          "pass the bench.json written by 'edgeft bench'")
    return path, data


def load_report(path: Path, role: str = "report") -> dict:
    """Read and check a bench.json (a folder holding bench.json is accepted): a classification report, or a
    decoder one (``_kind`` tells them apart). Everything the gate reads is type-checked here, so a malformed
    report is one line and exit 2, never an internal error."""
    path, data = _read_report(path, role)
    if data["schema"] == DECODER_SCHEMA:
        return _check_decoder_report(data, path, role)
    if isinstance(data["schema"], str) and data["schema"].startswith("edgeft.decoder-bench/"):
        raise EdgeftError(f"{role} {path} has schema '{data['schema'][:60]}'; this edgeft gates decoder reports of "
                          f"'{DECODER_SCHEMA}' (edgeft.decoder-bench/1 kept medians only, no raw samples)",
                          "re-create it with this edgeft ('edgeft run' on the recipe)")

    def bad(what: str) -> None:
        raise EdgeftError(f"{role} {path}: {what}", "re-run 'edgeft bench'; the gate reads only its reports")

    if data["schema"] != SCHEMA:
        raise EdgeftError(f"{role} {path} has schema '{str(data['schema'])[:60]}'; this edgeft reads '{SCHEMA}'",
                          "re-create the baseline with this edgeft version")
    results = data.get("results")
    if not isinstance(results, list):
        raise EdgeftError(f"{role} {path} has no 'results' list", "re-run 'edgeft bench'")
    seen: set[str] = set()
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"key", "model", "status"} <= set(r):
            bad(f"results[{i}] lacks key/model/status")
        for f in ("key", "model", "status"):
            if not isinstance(r[f], str):
                bad(f"results[{i}].{f} is not a string")
        if r["status"] != "ok":
            continue
        where = f"result {r['key'][:120]}"
        if r["key"] in seen:
            bad(f"{where} appears twice")
        seen.add(r["key"])
        for f in ("runtime", "precision"):
            if not isinstance(r.get(f, ""), str):
                bad(f"{where}: {f} is not a string")
        for f in ("batch", "seq"):
            if f in r and type(r[f]) is not int:
                bad(f"{where}: {f} is not an integer")
        acc = r.get("accuracy")
        if acc is not None and not (_number(acc) and math.isfinite(acc) and 0 <= acc <= 1):
            bad(f"{where}: accuracy {acc!r} is not a number in [0, 1]")
        r["_samples"] = _check_samples(r.get("samples_ms"), where, bad)
    for name, kind in (("environment", dict), ("reference", dict), ("eval", dict), ("models", list)):
        if data.get(name) is not None and not isinstance(data[name], kind):
            bad(f"'{name}' is not {'an object' if kind is dict else 'a list'}")
    env = data.get("environment") or {}
    for name in ("threads", "cpu"):
        if env.get(name) is not None and not isinstance(env[name], dict):
            bad(f"environment.{name} is not an object")
    ref = data.get("reference")
    if ref and not all(isinstance(ref.get(f), str) for f in ("model", "runtime", "precision")):
        bad("reference lacks model/runtime/precision strings")
    ev = data.get("eval")
    if ev and not isinstance(ev.get("sha256", ""), (str, type(None))):
        bad("eval.sha256 is not a string")
    _check_models(data, bad)
    return data


def _check_models(data: dict, bad) -> None:
    for m in data.get("models") or []:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) \
                or not isinstance(m.get("files", {}), dict) \
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in (m.get("files") or {}).items()):
            bad("'models' holds an entry without a name and a files {name: sha256} map")


def _positive_ms(s, where: str, bad) -> np.ndarray:
    """A list of latencies in ms, each a finite number > 0 (a round's median is taken on the log scale)."""
    if not isinstance(s, list) or not s or not all(type(x) in (int, float) for x in s):
        bad(f"{where} is not a non-empty list of numbers")
    arr = np.asarray(s, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        bad(f"{where} holds NaN, infinite, zero or negative values")
    return arr


def _check_decoder_report(data: dict, path: Path, role: str) -> dict:
    """Type-check an edgeft.decoder-bench/2 report (see edgeft.decoder.pipeline.bench_decoder); each row gets
    ``_steps`` [rounds, steps] and ``_ttft`` [rounds] arrays (ms) and ``_key`` (variant/tN)."""
    def bad(what: str) -> None:
        raise EdgeftError(f"{role} {path}: {what}",
                          "re-run the decoder bench ('edgeft run' on the recipe); the gate reads only its reports")

    rows = data.get("rows")
    if not isinstance(rows, list):
        raise EdgeftError(f"{role} {path} has no 'rows' list", "re-run the decoder bench ('edgeft run' on the recipe)")
    for name in ("prompt_tokens", "new_tokens", "repeats"):
        if type(data.get(name)) is not int or data[name] < 1:
            bad(f"'{name}' is not a positive integer")
    rounds, steps = data["repeats"], data["new_tokens"] - 1
    for name, kind in (("cpu", dict), ("eval", dict), ("prompt", dict), ("models", list)):
        if data.get(name) is not None and not isinstance(data[name], kind):
            bad(f"'{name}' is not {'an object' if kind is dict else 'a list'}")
    for name in ("reference", "chosen"):
        if not isinstance(data.get(name), (str, type(None))):
            bad(f"'{name}' is not a string")
    for name, field_ in (("cpu", "model"), ("eval", "sha256"), ("prompt", "sha256")):
        if not isinstance((data.get(name) or {}).get(field_), (str, type(None))):
            bad(f"{name}.{field_} is not a string")
    _check_models(data, bad)
    seen: set[str] = set()
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("variant"), str) \
                or type(r.get("threads")) is not int or r["threads"] < 1:
            bad(f"rows[{i}] lacks a variant name and a positive integer thread count")
        key = f"{r['variant']}/t{r['threads']}"
        where = f"row {key[:120]}"
        if key in seen:
            bad(f"{where} appears twice")
        seen.add(key)
        per_round = r.get("decode_step_ms")
        if not isinstance(per_round, list) or len(per_round) != rounds:
            bad(f"{where} has no valid raw samples (decode_step_ms: one list of step latencies per round, "
                f"{rounds} rounds)")
        if steps:
            arrs = [_positive_ms(x, f"{where}: decode_step_ms[{j}]", bad) for j, x in enumerate(per_round)]
            if any(a.size != steps for a in arrs):
                bad(f"{where}: a round of decode_step_ms does not hold new_tokens - 1 = {steps} steps")
            r["_steps"] = np.stack(arrs)
        elif any(x != [] for x in per_round):
            bad(f"{where}: decode_step_ms holds steps but new_tokens is 1")
        else:
            r["_steps"] = np.zeros((rounds, 0))
        r["_ttft"] = _positive_ms(r.get("ttft_round_ms"), f"{where}: ttft_round_ms", bad)
        if r["_ttft"].size != rounds:
            bad(f"{where}: ttft_round_ms holds {r['_ttft'].size} values for {rounds} rounds")
        ppl = r.get("test_perplexity")
        if ppl is not None and not (_number(ppl) and math.isfinite(ppl) and ppl > 0):
            bad(f"{where}: test_perplexity {ppl!r} is not a finite number > 0")
        r["_key"] = key
    return data


def _kind(report: dict) -> str:
    return "decoder" if report["schema"] == DECODER_SCHEMA else "classification"


def model_identities(report: dict) -> dict[str, str | None]:
    """Model name -> sha256 over its sorted (file, sha256) pairs as the bench recorded them (None: no files)."""
    out: dict[str, str | None] = {}
    for m in report.get("models") or []:
        files = m.get("files") or {}
        out[m["name"]] = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest() \
            if files else None
    return out


_TAGS = {"ok": "ok", "regression": "REGRESSION", "improvement": "faster", "inconclusive": "INCONCLUSIVE",
         "reference": "reference"}


@dataclass
class Comparison:
    key: str
    metric: str  # "latency" | "accuracy"
    verdict: str  # ok | regression | improvement | inconclusive | reference
    baseline: float | None = None
    current: float | None = None
    change: float | None = None  # latency: ratio - 1; accuracy: points (current - baseline)
    ci: tuple[float, float] | None = None  # latency: ratio CI - 1
    p_value: float | None = None
    detail: str = ""
    needed: dict | None = None  # inconclusive latency: samples per side / seconds that would have resolved it

    def line(self) -> str:
        tag = _TAGS[self.verdict]
        if self.metric == "accuracy":
            what = (f"accuracy {self.baseline:.4f} -> {self.current:.4f} ({self.change:+.2f} pt)"
                    if self.change is not None else "accuracy not compared")
        else:
            unit = "" if "normalised" in self.detail else " ms"
            what = f"latency p50 {self.baseline:.4g} -> {self.current:.4g}{unit}"
            if self.change is not None:
                what += f" ({self.change:+.1%}"
                if self.ci:
                    what += f", 95% CI {self.ci[0]:+.1%}..{self.ci[1]:+.1%}"
                if self.p_value is not None:
                    what += f", rank-test p={self.p_value:.2g}"
                what += ")"
        return f"  {tag:<12} {self.key:<48} {what}{'  ' + self.detail if self.detail else ''}"


@dataclass
class DecoderComparison(Comparison):
    """A decoder row's comparison; metric: "decode" (ms per token) | "ttft" (ms) | "perplexity"."""

    rounds: tuple[int, int] | None = None  # latency: rounds (baseline, current)

    def line(self) -> str:
        if self.verdict == "reference":
            what = "decode and first token: the normaliser of the other rows"
        elif self.metric == "perplexity":
            what = (f"perplexity {self.baseline:.4g} -> {self.current:.4g} ({self.change:+.2%})"
                    if self.change is not None else "perplexity not compared")
        else:
            label = {"decode": "decode ms/token", "ttft": "first token ms"}[self.metric]
            if "normalised" in self.detail:
                label = label.replace(" ms/token", "/token").replace(" ms", "") + " (x reference)"
            what = f"{label} {self.baseline:.4g} -> {self.current:.4g}"
            if self.change is not None:
                what += f" ({self.change:+.1%}"
                if self.ci:
                    what += f", 95% CI {self.ci[0]:+.1%}..{self.ci[1]:+.1%}"
                if self.rounds:
                    what += f", {self.rounds[0]} v {self.rounds[1]} rounds"
                what += ")"
        return f"  {_TAGS[self.verdict]:<12} {self.key:<48} {what}{'  ' + self.detail if self.detail else ''}"


@dataclass
class GateResult:
    comparisons: list[Comparison] = field(default_factory=list)
    only_in_baseline: list[str] = field(default_factory=list)
    only_in_current: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # name -> {baseline, current, same}: the files' identities

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.comparisons)

    @property
    def verdict(self) -> str:
        if self.count("regression"):
            return "regression"
        if self.count("inconclusive"):
            return "inconclusive"
        return "pass"

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "pass" else 1

    def _thresholds(self) -> str:
        s = self.settings
        return (f"latency threshold +{s.get('max_latency_regression', 0):.0%}"
                f"{', normalised by the reference model' if s.get('normalize') else ''}; "
                f"accuracy drop <= {s.get('max_accuracy_drop')} pt")

    def _inconclusive_advice(self) -> str:
        return ("  inconclusive comparisons fail the gate (exit 1): each line says what would resolve it; "
                "the A/B gate (--baseline-model OLD --candidate NEW) cancels machine drift")

    def render(self) -> str:
        head = {"pass": "PASS", "regression": "REGRESSION", "inconclusive": "INCONCLUSIVE (not a pass)"}[self.verdict]
        lines = [f"gate: {head}: {self.count('regression')} regressed, {self.count('inconclusive')} inconclusive, "
                 f"{self.count('ok') + self.count('improvement')} ok of {len(self.comparisons)} comparisons "
                 f"({self._thresholds()})"]
        order = {"regression": 0, "inconclusive": 1, "improvement": 2, "ok": 3, "reference": 4}
        lines += [c.line() for c in sorted(self.comparisons, key=lambda c: order[c.verdict])]
        if self.only_in_baseline:
            lines.append(f"  unmatched: only in baseline: {', '.join(self.only_in_baseline)}")
        if self.only_in_current:
            lines.append(f"  unmatched: only in current: {', '.join(self.only_in_current)}")
        differ = [n for n, m in self.models.items() if m["same"] is False]
        if differ:
            lines.append(f"  DIFFERENT checkpoint under the same name: {', '.join(differ)} (the files differ from the "
                         "baseline's; pass --expect-same-model to refuse this)")
        lines += [f"  note: {n}" for n in self.notes]
        if self.verdict == "inconclusive":
            lines.append(self._inconclusive_advice())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"schema": GATE_SCHEMA, "verdict": self.verdict, "exit_code": self.exit_code, "settings": self.settings,
                "comparisons": [c.__dict__ | {"ci": list(c.ci) if c.ci else None} for c in self.comparisons],
                "only_in_baseline": self.only_in_baseline, "only_in_current": self.only_in_current,
                "models": self.models, "notes": self.notes}


@dataclass
class DecoderGateResult(GateResult):
    """The gate on two decoder bench reports: the same verdicts, its own thresholds and advice."""

    def _thresholds(self) -> str:
        s = self.settings
        return (f"decoder bench; latency threshold +{s.get('max_latency_regression', 0):.0%}"
                f"{', each round normalised by the reference variant' if s.get('normalize') else ''}; "
                f"perplexity increase <= +{s.get('max_perplexity_increase', 0):.1%}")

    def _inconclusive_advice(self) -> str:
        return ("  inconclusive comparisons fail the gate (exit 1): each line says what would resolve it"
                + ("" if self.settings.get("normalize") else
                   "; --normalize (each round against the in-run reference variant) cancels most machine drift"))


def _ok_results(report: dict) -> dict[str, dict]:
    return {r["key"]: r for r in report["results"] if r["status"] == "ok"}


def _ref_key(report: dict, r: dict) -> str | None:
    ref = report.get("reference")
    if not ref:
        return None
    return f"{ref['model']}/{ref['runtime']}/{ref['precision']}/b{r.get('batch')}/s{r.get('seq')}"


def _needed(comp: Comparison, n: int, mean_ms: float, thr: float, lo: float, hi: float, point: float) -> None:
    """Say how many samples per side would have put 1 + thr outside the CI (its width falls as 1/sqrt(n))."""
    d = abs(math.log(point) - math.log1p(thr))
    half = (math.log(hi) - math.log(lo)) / 2
    if d < 1e-9 or half <= 0:
        comp.needed = {"samples_per_side": None, "seconds": None}
        comp.detail += "; the ratio sits on the threshold: more samples cannot resolve it"
        return
    need = max(n + 1, math.ceil(n * (half / d) ** 2))
    secs = need * mean_ms / 1000 * 4 / 3  # + the 50 ms idle per 150 ms block of the bench's method
    comp.needed = {"samples_per_side": need, "seconds": secs}
    comp.detail += (f"; resolving it needs about {need} samples per side (~{secs:.0f}s of timing for this variant: "
                    f"--set bench.max_seconds_per_variant={math.ceil(secs)}), or the A/B gate")


def _decide(comp: Comparison, point: float, lo: float, hi: float, cvs: dict[str, float], thr: float, max_cv: float,
            on_hold, spread_advice: str) -> None:
    """The verdict and detail from the ratio's CI (lo..hi) and each sample set's robust CV, by the module
    docstring's rules (shared by classification results and decoder rows). ``on_hold()`` adds what would
    resolve a CI that holds the threshold; ``spread_advice`` says what to do about a grossly spread run."""
    unstable = [f"{name} robust CV {cv:.1%}" for name, cv in cvs.items() if cv > max_cv]
    noisy = [f"{name} robust CV {cv:.1%}" for name, cv in cvs.items() if NOISY_CV < cv <= max_cv]
    limit = 1 + thr
    if lo > limit:
        comp.verdict = "regression"  # the whole CI beyond the threshold: whatever the CV
        if unstable:
            comp.detail = f"unstable ({', '.join(unstable)}) but the whole CI is beyond +{thr:.0%}"
    elif unstable:
        comp.verdict = "inconclusive"
        comp.detail = (f"unstable: {', '.join(unstable)} > {max_cv:.0%} and the CI does not clear the threshold; "
                       + spread_advice)
    elif hi >= limit:
        comp.verdict = "inconclusive"
        comp.detail = (f"the 95% CI ({lo - 1:+.1%}..{hi - 1:+.1%}) holds the +{thr:.0%} threshold"
                       + (f" ({', '.join(noisy)})" if noisy else ""))
        on_hold()
    elif point < 1 / limit and hi < 1:
        comp.verdict = "improvement"
    if noisy and comp.verdict in ("ok", "improvement", "regression"):
        comp.detail = f"noisy ({', '.join(noisy)} > {NOISY_CV:.0%}) but the CI resolves the threshold"


def _latency(key: str, cur: dict, base: dict, thr: float, max_cv: float,
             cur_ref: dict | None = None, base_ref: dict | None = None) -> Comparison:
    from edgeft.bench.stats import bootstrap_ratio_ci, mann_whitney, robust_cv

    def arr(r: dict) -> np.ndarray:  # checked by load_report; edgeft.verify passes plain {"samples_ms": [...]}
        return r["_samples"] if "_samples" in r else np.asarray(r["samples_ms"], dtype=np.float64)

    a, b = arr(base), arr(cur)
    sets = [("baseline", a), ("current", b)]
    normalised = cur_ref is not None
    if normalised:
        ar, br = arr(base_ref), arr(cur_ref)
        sets += [("baseline reference", ar), ("current reference", br)]
    ma, mb = float(np.median(a)), float(np.median(b))
    if normalised:
        ma, mb = ma / float(np.median(ar)), mb / float(np.median(br))
    comp = Comparison(key, "latency", "ok", baseline=ma, current=mb,
                      detail="(normalised by the reference)" if normalised else "")
    few = [f"{name} n={len(s)}" for name, s in sets if len(s) < MIN_SAMPLES]
    if few:
        comp.verdict, comp.detail = "inconclusive", f"too few samples ({', '.join(few)} < {MIN_SAMPLES})"
        comp.needed = {"samples_per_side": MIN_SAMPLES, "seconds": None}
        return comp
    point, lo, hi = bootstrap_ratio_ci(a, b, base_ref=ar if normalised else None,
                                       current_ref=br if normalised else None,
                                       confidence=CONFIDENCE)
    comp.change, comp.ci = point - 1, (lo - 1, hi - 1)
    if not normalised:
        comp.p_value = mann_whitney(a, b)["p_value"]
    cvs = {name: robust_cv(s) for name, s in sets}
    n = min(len(a), len(b))
    mean_ms = max(float(np.mean(a)), float(np.mean(b)))
    _decide(comp, point, lo, hi, cvs, thr, max_cv, lambda: _needed(comp, n, mean_ms, thr, lo, hi, point),
            "more samples do not fix a spread bulk: re-run on a quieter machine, or use the A/B gate")
    if normalised:
        comp.detail = ("(normalised by the reference) " + comp.detail).strip()
    return comp


def _check_same_models(cur: dict, base: dict, current: Path, baseline: Path) -> None:
    cm = {r["model"] for r in cur["results"]}
    bm = {r["model"] for r in base["results"]}
    if cm != bm:
        parts = []
        if bm - cm:
            parts.append(f"only in the baseline: {', '.join(sorted(bm - cm))}")
        if cm - bm:
            parts.append(f"only in the current report: {', '.join(sorted(cm - bm))}")
        raise EdgeftError(f"{current} and baseline {baseline} bench different model sets ({'; '.join(parts)})",
                          "gate a bench of the same models as the baseline, or re-create the baseline")


def gate(current: Path, baseline: Path, *, max_latency_regression: float, max_accuracy_drop: float | None = None,
         normalize: bool = False, max_cv: float = MAX_CV, expect_same_model: bool = False,
         max_perplexity_increase: float | None = None) -> GateResult:
    """Compare ``current`` against ``baseline`` (both bench.json of the same kind); see the module docstring.
    ``max_accuracy_drop`` (points, default 0.5) is for classification reports, ``max_perplexity_increase``
    (a fraction, default 2 %) for decoder reports; None: the default, and giving one for the other kind is an error."""
    if max_accuracy_drop is not None and (not _number(max_accuracy_drop) or not math.isfinite(max_accuracy_drop)
                                          or max_accuracy_drop < 0):
        raise EdgeftError(f"--max-accuracy-drop {max_accuracy_drop} is not a number of points >= 0",
                          "give points, e.g. 0.5")
    if not _number(max_latency_regression) or not math.isfinite(max_latency_regression) \
            or not 0 <= max_latency_regression < 1:
        raise EdgeftError(f"--max-latency-regression {max_latency_regression} is not a fraction in [0, 1)",
                          "write it like 10%")
    if max_perplexity_increase is not None and (not _number(max_perplexity_increase)
                                                or not math.isfinite(max_perplexity_increase)
                                                or not 0 <= max_perplexity_increase < 1):
        raise EdgeftError(f"--max-perplexity-increase {max_perplexity_increase} is not a fraction in [0, 1)",
                          "write it like 2%")
    cur = load_report(Path(current), "current report")
    base = load_report(Path(baseline), "baseline")
    kinds = _kind(cur), _kind(base)
    if kinds[0] != kinds[1]:
        raise EdgeftError(f"current report {current} is a {kinds[0]} bench ({str(cur['schema'])[:60]}) but baseline "
                          f"{baseline} is a {kinds[1]} bench ({str(base['schema'])[:60]})",
                          "gate a decoder bench.json against a decoder one, a classification one against a "
                          "classification one")
    if kinds[0] == "decoder":
        if max_accuracy_drop is not None:
            raise EdgeftError("--max-accuracy-drop (points of accuracy) applies to classification bench reports",
                              "gate a decoder bench's perplexity with --max-perplexity-increase, e.g. 2%")
        return _gate_decoder(cur, base, Path(current), Path(baseline), thr=max_latency_regression,
                             max_ppl_increase=DEFAULT_MAX_PERPLEXITY_INCREASE if max_perplexity_increase is None
                             else max_perplexity_increase,
                             normalize=normalize, max_cv=max_cv, expect_same_model=expect_same_model)
    if max_perplexity_increase is not None:
        raise EdgeftError("--max-perplexity-increase applies to decoder bench reports",
                          "gate a classification bench's accuracy with --max-accuracy-drop (points)")
    if max_accuracy_drop is None:
        max_accuracy_drop = DEFAULT_MAX_ACCURACY_DROP
    _check_same_models(cur, base, Path(current), Path(baseline))
    ids_c, ids_b = model_identities(cur), model_identities(base)
    models = {name: {"baseline": ids_b.get(name), "current": ids_c.get(name),
                     "same": None if ids_b.get(name) is None or ids_c.get(name) is None
                     else ids_b[name] == ids_c[name]}
              for name in sorted({r["model"] for r in cur["results"]})}
    differ = [n for n, m in models.items() if m["same"] is False]
    if expect_same_model and differ:
        raise EdgeftError(f"{current} benched other checkpoints than baseline {baseline} under the same names "
                          f"({', '.join(differ)}: the files' sha256 differ)",
                          "gate the same model files, or drop --expect-same-model to compare different checkpoints")
    cur_ok, base_ok = _ok_results(cur), _ok_results(base)
    common = [k for k in base_ok if k in cur_ok]
    if not common:
        raise EdgeftError(f"{current} and baseline {baseline} have no result key in common",
                          "bench the same runtimes, batch sizes and sequence lengths as the baseline")
    res = GateResult(only_in_baseline=[k for k in base_ok if k not in cur_ok],
                     only_in_current=[k for k in cur_ok if k not in base_ok],
                     settings={"max_latency_regression": max_latency_regression,
                               "max_accuracy_drop": max_accuracy_drop, "normalize": normalize, "max_cv": max_cv,
                               "confidence": CONFIDENCE, "current": str(current), "baseline": str(baseline),
                               "expect_same_model": expect_same_model},
                     models=models)
    if normalize and (not cur.get("reference") or not base.get("reference")
                      or cur["reference"] != base["reference"]):
        raise EdgeftError("--normalize needs the same in-run reference model in both reports "
                          f"(baseline: {base.get('reference')}, current: {cur.get('reference')})",
                          "bench with the reference model included, or gate without --normalize")

    for key in common:
        c, b = cur_ok[key], base_ok[key]
        if normalize:
            rk_c, rk_b = _ref_key(cur, c), _ref_key(base, b)
            if key in (rk_c, rk_b):
                res.comparisons.append(Comparison(key, "latency", "reference", baseline=1.0, current=1.0,
                                                  detail="(the normaliser; compared in absolute terms only without --normalize)"))
                continue
            if rk_c not in cur_ok or rk_b not in base_ok:
                res.comparisons.append(Comparison(key, "latency", "inconclusive", baseline=float("nan"),
                                                  current=float("nan"),
                                                  detail="reference result missing at this batch/seq"))
                continue
            res.comparisons.append(_latency(key, c, b, max_latency_regression, max_cv, cur_ok[rk_c], base_ok[rk_b]))
        else:
            res.comparisons.append(_latency(key, c, b, max_latency_regression, max_cv))

    # Accuracy: once per model/runtime/precision; only on the same evaluation data.
    ce, be = cur.get("eval"), base.get("eval")
    seen = set()
    for key in common:
        c, b = cur_ok[key], base_ok[key]
        label = f"{c['model']}/{c.get('runtime')}/{c.get('precision')}"
        if label in seen:
            continue
        seen.add(label)
        if c.get("accuracy") is None or b.get("accuracy") is None:
            if (c.get("accuracy") is None) != (b.get("accuracy") is None):
                res.notes.append(f"accuracy of {label} not compared: only the "
                                 f"{'baseline' if c.get('accuracy') is None else 'current report'} has one")
            continue
        if not ce or not be or ce.get("sha256") != be.get("sha256"):
            raise EdgeftError(f"accuracy in {current} and baseline {baseline} was measured on different data "
                              f"({(be or {}).get('dataset')}:{(be or {}).get('split')} n={(be or {}).get('n')} vs "
                              f"{(ce or {}).get('dataset')}:{(ce or {}).get('split')} n={(ce or {}).get('n')})",
                              "bench with the baseline's --data and max_eval_samples")
        delta = (c["accuracy"] - b["accuracy"]) * 100
        res.comparisons.append(Comparison(label, "accuracy", "regression" if -delta > max_accuracy_drop + 1e-9 else "ok",
                                          baseline=b["accuracy"], current=c["accuracy"], change=delta))

    cenv, benv = cur.get("environment") or {}, base.get("environment") or {}
    ct, bt = cenv.get("threads") or {}, benv.get("threads") or {}
    if ct.get("intra_op") != bt.get("intra_op"):
        res.notes.append(f"intra-op threads differ: baseline {bt.get('intra_op')}, current {ct.get('intra_op')}")
    ccpu, bcpu = (cenv.get("cpu") or {}).get("model"), (benv.get("cpu") or {}).get("model")
    if ccpu != bcpu:
        res.notes.append(f"CPU differs: baseline '{bcpu}', current '{ccpu}'"
                         + ("" if normalize else "; consider --normalize"))
    return res


# ---------------------------------------------------------------- decoder bench reports


@functools.lru_cache(maxsize=128)
def _u_cdf(n: int, m: int) -> np.ndarray:
    """P(U <= u), u = 0..n*m: the exact null distribution of the Mann-Whitney count U (pairs in which the first
    sample's value is the larger) for samples of n and m: the largest of i + j values is the first sample's
    with probability i / (i + j), and then beats all j of the second."""
    prev = [np.ones(1) for _ in range(m + 1)]  # i = 0: U = 0
    for i in range(1, n + 1):
        cur = [np.ones(1)]  # j = 0: U = 0
        for j in range(1, m + 1):
            p = np.zeros(i * j + 1)
            p[j:] += i / (i + j) * prev[j]
            p[:i * (j - 1) + 1] += j / (i + j) * cur[j - 1]
            cur.append(p)
        prev = cur
    return np.cumsum(prev[m])


def _rank_k(n: int, m: int) -> int:
    """The largest k with P(U <= k - 1) <= (1 - CONFIDENCE) / 2 (0: no interval at this confidence): the
    interval is the k-th smallest to the k-th largest pairwise difference. Exact up to 2500 pairs, then the
    normal approximation (with continuity correction), accurate at those sizes."""
    tail = (1 - CONFIDENCE) / 2
    if n * m <= 2500:
        ok = np.flatnonzero(_u_cdf(n, m) <= tail + 1e-12)
        return int(ok[-1]) + 1 if ok.size else 0
    sigma = math.sqrt(n * m * (n + m + 1) / 12)
    return max(0, math.floor(n * m / 2 + 0.5 - 1.959963984540054 * sigma))


def _rank_shift_ci(base_log: np.ndarray, cur_log: np.ndarray) -> tuple[float, float, float] | None:
    """exp of the Hodges-Lehmann shift (the median of every current - baseline difference of the rounds' log
    values) and its distribution-free interval at ``CONFIDENCE`` (Mann-Whitney inverted); None when so few
    rounds allow no such interval. A round stalled by a neighbour moves a median, not the interval's ends much."""
    k = _rank_k(base_log.size, cur_log.size)
    if k == 0:
        return None
    diffs = np.sort((cur_log[:, None] - base_log[None, :]).ravel())
    return math.exp(float(np.median(diffs))), math.exp(float(diffs[k - 1])), math.exp(float(diffs[-k]))


def _rounds_needed(comp: Comparison, n: int, point: float, lo: float, hi: float, thr: float, round_s: float,
                   normalised: bool) -> None:
    """About how many rounds per side would put 1 + thr outside the interval (the same spread: its width falls
    as 1/sqrt(rounds))."""
    d = abs(math.log(point) - math.log1p(thr))
    half = (math.log(hi) - math.log(lo)) / 2
    if d < 1e-9 or half <= 0:
        comp.needed = {"rounds_per_side": None, "seconds": None}
        comp.detail += "; the ratio sits on the threshold: more rounds cannot resolve it"
        return
    need = max(n + 1, math.ceil(n * (half / d) ** 2))
    secs = need * round_s
    comp.needed = {"rounds_per_side": need, "seconds": secs}
    other = "" if normalised else ", or --normalize"
    if need > MAX_BENCH_REPEATS:
        comp.detail += (f"; resolving it needs about {need} rounds per side, more than bench.repeats allows "
                        f"({MAX_BENCH_REPEATS}): a quieter machine{other}")
    else:
        comp.detail += (f"; resolving it needs about {need} rounds per side (~{secs:.2g}s of generation for this "
                        f"row: --set bench.repeats={need}){other}")


def _round_values(row: dict, metric: str) -> np.ndarray:
    """One value per round (ms): the median decode step, or the time to first token."""
    return np.median(row["_steps"], axis=1) if metric == "decode" else row["_ttft"]


def _decoder_latency(key: str, metric: str, cur: dict, base: dict, thr: float, max_cv: float,
                     cur_ref: dict | None = None, base_ref: dict | None = None) -> DecoderComparison:
    from edgeft.bench.stats import robust_cv

    normalised = cur_ref is not None
    vb, vc = _round_values(base, metric), _round_values(cur, metric)
    sets = [("baseline", base), ("current", cur)]
    if normalised:  # round r of the reference ran in the same interleaved round as round r of the variant
        vb, vc = vb / _round_values(base_ref, metric), vc / _round_values(cur_ref, metric)
        sets += [("baseline reference", base_ref), ("current reference", cur_ref)]
    lb, lc = np.log(vb), np.log(vc)
    comp = DecoderComparison(key, metric, "ok", baseline=math.exp(float(np.median(lb))),
                             current=math.exp(float(np.median(lc))), rounds=(int(lb.size), int(lc.size)))
    few = [f"{name} {r['_ttft'].size}" for name, r in sets if r["_ttft"].size < MIN_ROUNDS]
    ci = None if few else _rank_shift_ci(lb, lc)
    if ci is None:
        comp.verdict = "inconclusive"
        comp.detail = (f"too few rounds ({', '.join(few or [f'{lb.size} v {lc.size}'])} < {MIN_ROUNDS} a side) for a "
                       f"95% interval: --set bench.repeats={MIN_ROUNDS} or more (10 or more for a +10% threshold "
                       "on a noisy machine)")
        comp.needed = {"rounds_per_side": MIN_ROUNDS, "seconds": None}
    else:
        point, lo, hi = ci
        comp.change, comp.ci = point - 1, (lo - 1, hi - 1)
        # the spread of the bulk, as for classification samples: the decode steps pooled over the rounds; the
        # time to first token is one value per round, so only its interval speaks
        cvs = {name: robust_cv(r["_steps"].ravel()) for name, r in sets} if metric == "decode" else {}
        round_s = max(float(np.mean(r["_ttft"] + r["_steps"].sum(axis=1))) for _, r in sets[:2]) / 1000
        n = min(lb.size, lc.size)
        _decide(comp, point, lo, hi, cvs, thr, max_cv,
                lambda: _rounds_needed(comp, n, point, lo, hi, thr, round_s, normalised),
                "more rounds do not fix a spread bulk: re-run on a quieter machine"
                + ("" if normalised else ", or gate with --normalize"))
    if normalised:
        comp.detail = ("(normalised by the reference) " + comp.detail).strip()
    return comp


def _gate_decoder(cur: dict, base: dict, current: Path, baseline: Path, *, thr: float, max_ppl_increase: float,
                  normalize: bool, max_cv: float, expect_same_model: bool) -> DecoderGateResult:
    for name in ("prompt_tokens", "new_tokens"):
        if cur[name] != base[name]:
            raise EdgeftError(f"{current} and baseline {baseline} time different generations ({name} "
                              f"{base[name]} in the baseline, {cur[name]} in the current report)",
                              "bench with the baseline's bench.prompt_tokens and bench.new_tokens")
    cur_rows = {r["_key"]: r for r in cur["rows"]}
    base_rows = {r["_key"]: r for r in base["rows"]}
    common = [k for k in base_rows if k in cur_rows]
    if not common:
        raise EdgeftError(f"{current} and baseline {baseline} have no (variant, threads) row in common",
                          "bench the baseline's variants at its thread counts")
    variants = list(dict.fromkeys(base_rows[k]["variant"] for k in common))
    ids_c, ids_b = model_identities(cur), model_identities(base)
    models = {v: {"baseline": ids_b.get(v), "current": ids_c.get(v),
                  "same": None if ids_b.get(v) is None or ids_c.get(v) is None else ids_b[v] == ids_c[v]}
              for v in sorted(variants)}
    differ = [v for v, m in models.items() if m["same"] is False]
    if expect_same_model and differ:
        raise EdgeftError(f"{current} benched other model files than baseline {baseline} under the same variant "
                          f"names ({', '.join(differ)}: the files' sha256 differ)",
                          "gate the same model files, or drop --expect-same-model to compare different ones")
    ref = cur.get("reference")
    if normalize and (not ref or ref != base.get("reference")):
        raise EdgeftError("--normalize needs the same in-run reference variant in both reports "
                          f"(baseline: {base.get('reference')}, current: {ref})",
                          "bench with the same reference (bench.torch), or gate without --normalize")
    res = DecoderGateResult(
        only_in_baseline=[k for k in base_rows if k not in cur_rows],
        only_in_current=[k for k in cur_rows if k not in base_rows],
        settings={"report_schema": DECODER_SCHEMA, "max_latency_regression": thr,
                  "max_perplexity_increase": max_ppl_increase, "normalize": normalize, "max_cv": max_cv,
                  "confidence": CONFIDENCE, "min_rounds": MIN_ROUNDS, "current": str(current),
                  "baseline": str(baseline), "expect_same_model": expect_same_model},
        models=models)

    for key in common:
        c, b = cur_rows[key], base_rows[key]
        refs: tuple = ()
        if normalize:
            if c["variant"] == ref:
                res.comparisons.append(DecoderComparison(
                    key, "decode", "reference", baseline=1.0, current=1.0,
                    detail="(compared in absolute terms only without --normalize)"))
                continue
            rk = f"{ref}/t{c['threads']}"
            if rk not in cur_rows or rk not in base_rows:
                res.comparisons.append(DecoderComparison(key, "decode", "inconclusive", baseline=float("nan"),
                                                         current=float("nan"),
                                                         detail="reference row missing at this thread count"))
                continue
            refs = (cur_rows[rk], base_rows[rk])
        if cur["new_tokens"] > 1:
            res.comparisons.append(_decoder_latency(key, "decode", c, b, thr, max_cv, *refs))
        res.comparisons.append(_decoder_latency(key, "ttft", c, b, thr, max_cv, *refs))
    if cur["new_tokens"] == 1:
        res.notes.append("decode latency not compared: one new token per generation (no decode step)")

    # Perplexity: once per variant (the bench measures it once, at its largest thread count), same tokens only.
    ce, be = cur.get("eval"), base.get("eval")
    for v in variants:
        c = next(cur_rows[k] for k in common if cur_rows[k]["variant"] == v)
        b = next(base_rows[k] for k in common if base_rows[k]["variant"] == v)
        pc, pb = c.get("test_perplexity"), b.get("test_perplexity")
        if pc is None or pb is None:
            if (pc is None) != (pb is None):
                res.notes.append(f"perplexity of {v} not compared: only the "
                                 f"{'baseline' if pc is None else 'current report'} has one")
            continue
        if not ce or not be or not ce.get("sha256") or ce.get("sha256") != be.get("sha256"):
            raise EdgeftError(f"perplexity in {current} and baseline {baseline} was measured on different test tokens "
                              f"({(be or {}).get('blocks')} x {(be or {}).get('block_size')} vs "
                              f"{(ce or {}).get('blocks')} x {(ce or {}).get('block_size')} tokens, or another text)",
                              "bench with the baseline's corpus, seed, data.block_size and data.eval_blocks")
        change = pc / pb - 1
        res.comparisons.append(DecoderComparison(v, "perplexity",
                                                 "regression" if change > max_ppl_increase + 1e-12 else "ok",
                                                 baseline=pb, current=pc, change=change))

    if (cur.get("prompt") or {}).get("sha256") != (base.get("prompt") or {}).get("sha256"):
        res.notes.append("the bench prompts differ (same lengths): the tokens generated differ too")
    if cur.get("chosen") != base.get("chosen"):
        res.notes.append(f"compress chose another variant: baseline {base.get('chosen')}, current {cur.get('chosen')}")
    ccpu, bcpu = (cur.get("cpu") or {}).get("model"), (base.get("cpu") or {}).get("model")
    if ccpu != bcpu:
        res.notes.append(f"CPU differs: baseline '{bcpu}', current '{ccpu}'"
                         + ("" if normalize else "; consider --normalize"))
    return res
