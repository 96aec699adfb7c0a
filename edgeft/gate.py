"""Regression gate: compare a bench.json against a stored baseline, on the raw samples.

Per result key present (status ok) in both reports:

- latency: ratio = median(current) / median(baseline) with a 95 % bootstrap CI (and a one-sided Mann-Whitney
  rank test, reported). With ``normalize`` each side is first divided by the in-run reference model's latency
  at the same batch/seq, so a baseline taken on one machine still gates on another.
  * ``regression``: ratio > 1 + threshold and the CI's lower bound > 1 (a shift beyond both threshold and noise);
  * ``inconclusive``: too few samples; either side grossly unstable (robust CV > ``max_cv``, 25 %); the CI
    wider than the threshold (the noise cannot resolve a shift of the threshold's size); or ratio > 1 +
    threshold while the CI still reaches 1 (cannot tell the shift from noise);
  * ``improvement``: ratio < 1 / (1 + threshold) and the CI's upper bound < 1;
  * ``ok`` otherwise.
- accuracy (once per model/runtime/precision): a drop of more than ``max_accuracy_drop`` points is a regression.

Exit code: 0 only when nothing regressed and nothing is inconclusive; 1 for a regression and also for an
inconclusive comparison (never a silent pass: the output says INCONCLUSIVE and why; re-run on a quieter
machine). Bad input (missing/empty/corrupt file, other schema version, other model set, no key in common,
different evaluation data) raises ``EdgeftError``: exit 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import EdgeftError

SCHEMA = "edgeft.bench/1"  # same as edgeft.bench.SCHEMA (kept here so the gate does not import the bench)
GATE_SCHEMA = "edgeft.gate/1"
MIN_SAMPLES = 20
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


def load_report(path: Path, role: str = "report") -> dict:
    """Read and check a bench.json (a folder holding bench.json is accepted)."""
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
    except json.JSONDecodeError as e:
        raise EdgeftError(f"{role} {path} is not valid JSON (line {e.lineno}: {e.msg})",
                          "re-run 'edgeft bench'; the file is truncated or corrupt") from None
    if not isinstance(data, dict) or "schema" not in data:
        raise EdgeftError(f"{role} {path} is not an edgeft bench report (no 'schema' field)",
                          "pass the bench.json written by 'edgeft bench'")
    if data["schema"] != SCHEMA:
        raise EdgeftError(f"{role} {path} has schema '{data['schema']}'; this edgeft reads '{SCHEMA}'",
                          "re-create the baseline with this edgeft version")
    results = data.get("results")
    if not isinstance(results, list):
        raise EdgeftError(f"{role} {path} has no 'results' list", "re-run 'edgeft bench'")
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"key", "model", "status"} <= set(r):
            raise EdgeftError(f"{role} {path}: results[{i}] lacks key/model/status", "re-run 'edgeft bench'")
        if r["status"] == "ok":
            s = r.get("samples_ms")
            if not isinstance(s, list) or not s or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0
                                                           for x in s):
                raise EdgeftError(f"{role} {path}: result {r['key']} has no valid raw samples",
                                  "re-run 'edgeft bench'; the gate decides on raw samples")
    return data


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

    def line(self) -> str:
        tag = {"ok": "ok", "regression": "REGRESSION", "improvement": "faster", "inconclusive": "INCONCLUSIVE",
               "reference": "reference"}[self.verdict]
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
class GateResult:
    comparisons: list[Comparison] = field(default_factory=list)
    only_in_baseline: list[str] = field(default_factory=list)
    only_in_current: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

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

    def render(self) -> str:
        s = self.settings
        head = {"pass": "PASS", "regression": "REGRESSION", "inconclusive": "INCONCLUSIVE (not a pass)"}[self.verdict]
        lines = [f"gate: {head}: {self.count('regression')} regressed, {self.count('inconclusive')} inconclusive, "
                 f"{self.count('ok') + self.count('improvement')} ok of {len(self.comparisons)} comparisons "
                 f"(latency threshold +{s.get('max_latency_regression', 0):.0%}"
                 f"{', normalised by the reference model' if s.get('normalize') else ''}; "
                 f"accuracy drop <= {s.get('max_accuracy_drop')} pt)"]
        order = {"regression": 0, "inconclusive": 1, "improvement": 2, "ok": 3, "reference": 4}
        lines += [c.line() for c in sorted(self.comparisons, key=lambda c: order[c.verdict])]
        if self.only_in_baseline:
            lines.append(f"  unmatched: only in baseline: {', '.join(self.only_in_baseline)}")
        if self.only_in_current:
            lines.append(f"  unmatched: only in current: {', '.join(self.only_in_current)}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.verdict == "inconclusive":
            lines.append("  inconclusive comparisons fail the gate (exit 1): re-run the bench on a quiet machine")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"schema": GATE_SCHEMA, "verdict": self.verdict, "exit_code": self.exit_code, "settings": self.settings,
                "comparisons": [c.__dict__ | {"ci": list(c.ci) if c.ci else None} for c in self.comparisons],
                "only_in_baseline": self.only_in_baseline, "only_in_current": self.only_in_current,
                "notes": self.notes}


def _ok_results(report: dict) -> dict[str, dict]:
    return {r["key"]: r for r in report["results"] if r["status"] == "ok"}


def _ref_key(report: dict, r: dict) -> str | None:
    ref = report.get("reference")
    if not ref:
        return None
    return f"{ref['model']}/{ref['runtime']}/{ref['precision']}/b{r['batch']}/s{r['seq']}"


def _latency(key: str, cur: dict, base: dict, thr: float, max_cv: float,
             cur_ref: dict | None = None, base_ref: dict | None = None) -> Comparison:
    from edgeft.bench.stats import bootstrap_ratio_ci, mann_whitney, robust_cv, summarize

    a, b = base["samples_ms"], cur["samples_ms"]
    sets = [("baseline", a), ("current", b)]
    if cur_ref is not None:
        sets += [("baseline reference", base_ref["samples_ms"]), ("current reference", cur_ref["samples_ms"])]
    normalised = cur_ref is not None
    ma, mb = summarize(a)["p50"], summarize(b)["p50"]
    if normalised:
        ma, mb = ma / summarize(base_ref["samples_ms"])["p50"], mb / summarize(cur_ref["samples_ms"])["p50"]
    comp = Comparison(key, "latency", "ok", baseline=ma, current=mb,
                      detail="(normalised by the reference)" if normalised else "")
    few = [f"{name} n={len(s)}" for name, s in sets if len(s) < MIN_SAMPLES]
    if few:
        comp.verdict, comp.detail = "inconclusive", f"too few samples ({', '.join(few)} < {MIN_SAMPLES})"
        return comp
    point, lo, hi = bootstrap_ratio_ci(a, b, base_ref=base_ref["samples_ms"] if normalised else None,
                                       current_ref=cur_ref["samples_ms"] if normalised else None,
                                       confidence=CONFIDENCE)
    comp.change, comp.ci = point - 1, (lo - 1, hi - 1)
    if not normalised:
        comp.p_value = mann_whitney(a, b)["p_value"]
    cvs = {name: robust_cv(s) for name, s in sets}
    unstable = [f"{name} robust CV {cv:.1%}" for name, cv in cvs.items() if cv > max_cv]
    noisy = [f"{name} robust CV {cv:.1%}" for name, cv in cvs.items() if NOISY_CV < cv <= max_cv]
    if unstable:
        comp.verdict = "inconclusive"
        comp.detail = f"unstable: {', '.join(unstable)} > {max_cv:.0%}"
    elif hi - lo > thr:
        comp.verdict = "inconclusive"
        comp.detail = (f"too noisy to resolve a {thr:.0%} shift: 95% CI {hi - lo:.1%} wide"
                       + (f" ({', '.join(noisy)})" if noisy else ""))
    elif point > 1 + thr and lo > 1:
        comp.verdict = "regression"
    elif point > 1 + thr:
        comp.verdict = "inconclusive"
        comp.detail = "slower beyond the threshold, but the CI reaches no change: noise or shift cannot be told apart"
    elif point < 1 / (1 + thr) and hi < 1:
        comp.verdict = "improvement"
    if noisy and comp.verdict in ("ok", "improvement", "regression"):
        comp.detail = f"noisy ({', '.join(noisy)} > {NOISY_CV:.0%}) but the CI resolves the threshold"
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


def gate(current: Path, baseline: Path, *, max_latency_regression: float, max_accuracy_drop: float,
         normalize: bool, max_cv: float = MAX_CV) -> GateResult:
    """Compare ``current`` against ``baseline`` (both bench.json); see the module docstring."""
    if max_accuracy_drop < 0:
        raise EdgeftError(f"--max-accuracy-drop {max_accuracy_drop} is negative", "give points, e.g. 0.5")
    cur = load_report(Path(current), "current report")
    base = load_report(Path(baseline), "baseline")
    _check_same_models(cur, base, Path(current), Path(baseline))
    cur_ok, base_ok = _ok_results(cur), _ok_results(base)
    common = [k for k in base_ok if k in cur_ok]
    if not common:
        raise EdgeftError(f"{current} and baseline {baseline} have no result key in common",
                          "bench the same runtimes, batch sizes and sequence lengths as the baseline")
    res = GateResult(only_in_baseline=[k for k in base_ok if k not in cur_ok],
                     only_in_current=[k for k in cur_ok if k not in base_ok],
                     settings={"max_latency_regression": max_latency_regression,
                               "max_accuracy_drop": max_accuracy_drop, "normalize": normalize, "max_cv": max_cv,
                               "confidence": CONFIDENCE, "current": str(current), "baseline": str(baseline)})
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
        label = f"{c['model']}/{c['runtime']}/{c['precision']}"
        if label in seen:
            continue
        seen.add(label)
        if c.get("accuracy") is None or b.get("accuracy") is None:
            continue
        if not ce or not be or ce.get("sha256") != be.get("sha256"):
            raise EdgeftError(f"accuracy in {current} and baseline {baseline} was measured on different data "
                              f"({(be or {}).get('dataset')}:{(be or {}).get('split')} n={(be or {}).get('n')} vs "
                              f"{(ce or {}).get('dataset')}:{(ce or {}).get('split')} n={(ce or {}).get('n')})",
                              "bench with the baseline's --data and max_eval_samples")
        delta = (c["accuracy"] - b["accuracy"]) * 100
        res.comparisons.append(Comparison(label, "accuracy", "regression" if -delta > max_accuracy_drop + 1e-9 else "ok",
                                          baseline=b["accuracy"], current=c["accuracy"], change=delta))

    ct, bt = cur["environment"].get("threads", {}), base["environment"].get("threads", {})
    if ct.get("intra_op") != bt.get("intra_op"):
        res.notes.append(f"intra-op threads differ: baseline {bt.get('intra_op')}, current {ct.get('intra_op')}")
    ccpu, bcpu = cur["environment"].get("cpu", {}).get("model"), base["environment"].get("cpu", {}).get("model")
    if ccpu != bcpu:
        res.notes.append(f"CPU differs: baseline '{bcpu}', current '{ccpu}'"
                         + ("" if normalize else "; consider --normalize"))
    return res
