"""Measure the A/B gate on the demo model: false alarms on identical models, catches of a slower one.

    python bench/gate_check.py [--run RUN_DIR] [--repeats 10] [--budget-seconds S] [--threshold 10%]

On RUN_DIR (default: ``runs/gate-check-demo``, made with ``edgeft run recipes/minilm-rotten-tomatoes.yaml``
when it does not exist yet) it runs the real CLI, one gate per subprocess, sequentially (a fresh process per
gate is what CI does):

- ``--repeats`` identical A/B runs: ``edgeft gate --baseline-model RUN --candidate RUN`` (both sides the
  variant ``edgeft ship`` would ship, e.g. int8; 2 intra-op threads each) -> each must exit 0;
- ``--repeats`` runs with a slower candidate: the same model at 1 intra-op thread against 2 for the
  baseline (``--baseline-threads 2 --candidate-threads 1``) -> each must exit 1 (REGRESSION); or, with
  ``--slower-candidate PATH``, a known slower model (e.g. the run's ``compress/onnx`` fp32 folder against
  the int8 baseline).

Per run it records the verdict, the exit code, the ratio and its CI, the rounds, the wall time of the gate
process and the robust CV of each side; with the CPU model and its int8 flags, the command line, the git commit
and the path + sha256 of the compress report(s) gated, into ``bench/results/<stamp>-ab-gate-check.{json,md}``.
Exit 0 when every run came out as expected.
Run it on the machine the figures are for, with nothing else running unless the noise is the point (the
load average at start and end is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = ROOT / "runs" / "gate-check-demo"
RECIPE = ROOT / "recipes" / "minilm-rotten-tomatoes.yaml"


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _cpu() -> dict:
    sys.path.insert(0, str(ROOT))
    from edgeft.artifacts import cpu_info

    return cpu_info()


def ensure_run(run: Path | None) -> Path:
    if run is not None:
        if not (run / "compress" / "report.json").is_file():
            raise SystemExit(f"gate-check: {run} has no compress/report.json: pass a compressed run folder")
        return run
    run = DEFAULT_RUN
    if (run / "compress" / "report.json").is_file():
        return run
    print(f"gate-check: making the demo run {run} (edgeft run {RECIPE.name}; minutes)", flush=True)
    cmd = [sys.executable, "-m", "edgeft.cli", "run", str(RECIPE), "--out", str(run), "--quiet"]
    if run.exists():
        cmd.append("--force")
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run


def gate_once(run: Path, scratch: Path, name: str, extra: list[str], common: list[str],
              candidate: Path | None = None) -> dict:
    out = scratch / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "edgeft.cli", "gate", "--baseline-model", str(run), "--candidate", str(candidate or run),
           *common, *extra, "--json-out", str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    row = {"run": name, "exit": p.returncode, "wall_s": round(wall, 2), "output": (p.stdout + p.stderr).strip(),
           "command": shlex.join(["edgeft", *cmd[3:-2]])}
    if out.is_file():
        d = json.loads(out.read_text())
        iv = d.get("interval") or {}
        row |= {"verdict": d["verdict"], "ratio": iv.get("ratio"), "ci": [iv.get("lo"), iv.get("hi")],
                "confidence": iv.get("confidence"), "rounds": d["rounds"], "pairs": d["pairs"], "looks": d["looks"],
                "measure_s": d["measure_s"],
                "cv_robust": {k: v.get("cv_robust") for k, v in d["per_side"].items()},
                "p50_ms": {k: v.get("p50_ms") for k, v in d["per_side"].items()},
                "threads": {s["role"]: s["threads"] for s in d["sides"]},
                "model": d["sides"][0]["model"], "precision": d["sides"][0]["precision"], "needed": d.get("needed")}
    else:
        row["verdict"] = "error"
    return row


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"# A/B gate check ({doc['created']})", "",
             f"- command: `{doc['command']}`", f"- git commit: `{doc['git_commit']}`"
             + (" (working tree had changes)" if doc["git_dirty"] else ""),
             f"- CPU: {doc['cpu']['model']}, usable cores {doc['cpu']['usable_cores']}, "
             f"int8-relevant flags: {', '.join(doc['cpu']['flags']) or 'none'} (VNNI: {doc['cpu']['has_vnni']})",
             f"- load average at start / end: {doc['loadavg_start']} / {doc['loadavg_end']}; busy-loop neighbours: "
             f"{doc.get('busy_cores', 0)}; intra-op threads per side: {doc.get('threads', 2)}",
             f"- run folder: `{doc['run']}`; threshold +{doc['threshold']}; budget {doc['budget']}",
             *(f"- compress report: `{r['path']}` sha256 `{r['sha256']}`" for r in doc.get("compress_reports") or []),
             f"- model: {s.get('model')} ({s.get('precision')})", "",
             f"**Identical models: {s['identical_pass']}/{s['identical_total']} exit 0 (false alarms: "
             f"{s['identical_false_alarms']}, inconclusive: {s['identical_inconclusive']}). "
             f"{doc['slow_case']}: {s['slower_caught']}/{s['slower_total']} exit 1 as REGRESSION.** "
             f"Gate wall time per run: median {_fmt(s['wall_s_median'], '.1f')} s, max {_fmt(s['wall_s_max'], '.1f')} s. "
             f"Robust CV per side seen: median {_fmt(s['cv_median'], '.1%')}, max {_fmt(s['cv_max'], '.1%')}.", "",
             "| run | expected | exit | verdict | ratio | CI | rounds | wall s | robust CV base / cand | p50 ms base / cand |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        cv, p50 = r.get("cv_robust") or {}, r.get("p50_ms") or {}
        ci = r.get("ci") or [None, None]
        lines.append(f"| {r['run']} | {r['expected']} | {r['exit']} | {r['verdict']} | {_fmt(r.get('ratio'))} | "
                     f"{_fmt(ci[0])}..{_fmt(ci[1])} | {r.get('rounds', '-')} | {r['wall_s']:.1f} | "
                     f"{_fmt(cv.get('baseline'), '.1%')} / {_fmt(cv.get('candidate'), '.1%')} | "
                     f"{_fmt(p50.get('baseline'), '.2f')} / {_fmt(p50.get('candidate'), '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="compressed run folder (default: make runs/gate-check-demo)")
    ap.add_argument("--repeats", type=int, default=10, help="gate runs per case (default 10)")
    ap.add_argument("--budget-seconds", type=float, default=None, help="the gate's --budget-seconds (default: its own)")
    ap.add_argument("--threshold", default="10%")
    ap.add_argument("--variant", default=None, help="the gate's --variant (default: the one ship picks)")
    ap.add_argument("--slower-candidate", type=Path, default=None,
                    help="a known slower model (e.g. the run's ONNX fp32 folder) as the slow case's candidate, "
                         "both sides at 2 threads, instead of the same model at 1 thread")
    ap.add_argument("--threads", type=int, default=2,
                    help="intra-op threads of both sides in the identical and slower-model cases (default 2)")
    ap.add_argument("--busy-cores", type=int, default=0,
                    help="start this many busy-loop processes for the whole check: a noisy neighbour (default 0)")
    ap.add_argument("--scratch", type=Path, default=ROOT / "runs" / "ab-gate-check")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores < 2:
        print("gate-check: needs 2 usable cores (the slower candidate runs 1 thread against 2)", file=sys.stderr)
        return 2

    run = ensure_run(args.run)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import compress_report

    # the compress report(s) of the models gated, hashed before the gates run
    reports = [compress_report(run / "compress" / "report.json")]
    if args.slower_candidate and (Path(args.slower_candidate) / "compress" / "report.json").is_file():
        reports.append(compress_report(Path(args.slower_candidate) / "compress" / "report.json"))
    args.scratch.mkdir(parents=True, exist_ok=True)
    common = ["--max-latency-regression", args.threshold]
    if args.budget_seconds is not None:
        common += ["--budget-seconds", str(args.budget_seconds)]
    if args.variant:
        common += ["--variant", args.variant]
    load_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    rows = []
    th = ["--threads", str(args.threads)]
    slow = ("slower model", 1, th, args.slower_candidate) if args.slower_candidate else \
        ("1 thread vs 2", 1, ["--baseline-threads", "2", "--candidate-threads", "1"], None)
    cases = [("identical", 0, th, None), slow]
    # A noisy neighbour: busy loops in their own processes, stopped when the check ends.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy_cores)]
    for case, expected, extra, candidate in cases:
        for i in range(1, args.repeats + 1):
            row = gate_once(run, args.scratch, f"{case.replace(' ', '-')}-{i}", extra, common, candidate)
            row |= {"case": case, "expected": expected, "run": f"{case} #{i}",
                    "as_expected": row["exit"] == expected and row["verdict"] == ("pass" if expected == 0 else "regression")}
            rows.append(row)
            print(f"  {row['run']:<18} exit {row['exit']} {row['verdict']:<12} ratio {_fmt(row.get('ratio'))} "
                  f"CI {_fmt((row.get('ci') or [None])[0])}..{_fmt((row.get('ci') or [None, None])[1])} "
                  f"{row['wall_s']:.1f}s{'' if row['as_expected'] else '  UNEXPECTED'}", flush=True)
            if row["verdict"] == "error":
                print(row["output"], file=sys.stderr)
    for h in hogs:
        h.kill()
        h.wait()
    ident = [r for r in rows if r["case"] == "identical"]
    slow = [r for r in rows if r["case"] != "identical"]
    cvs = [v for r in rows for v in (r.get("cv_robust") or {}).values() if v is not None]
    walls = sorted(r["wall_s"] for r in rows)
    summary = {"identical_total": len(ident), "identical_pass": sum(r["exit"] == 0 for r in ident),
               "identical_false_alarms": sum(r["verdict"] == "regression" for r in ident),
               "identical_inconclusive": sum(r["verdict"] == "inconclusive" for r in ident),
               "slower_total": len(slow), "slower_caught": sum(r["exit"] == 1 and r["verdict"] == "regression" for r in slow),
               "wall_s_median": walls[len(walls) // 2], "wall_s_max": walls[-1],
               "cv_median": sorted(cvs)[len(cvs) // 2] if cvs else None, "cv_max": max(cvs) if cvs else None,
               "model": next((r.get("model") for r in rows if r.get("model")), None),
               "precision": next((r.get("precision") for r in rows if r.get("precision")), None),
               "as_expected": all(r["as_expected"] for r in rows)}
    stamp = time.strftime("%Y%m%d-%H%M")
    doc = {"schema": "edgeft.ab-gate-check/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else
           shlex.join(["python", "bench/gate_check.py", *argv]),
           "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
           "cpu": _cpu(), "platform": platform.platform(), "loadavg_start": load_start,
           "loadavg_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
           "run": str(run), "compress_reports": reports, "threshold": args.threshold,
           "slow_case": f"Candidate {args.slower_candidate} ({args.threads} threads each)" if args.slower_candidate
           else "Candidate at 1 intra-op thread vs 2",
           "budget": f"{args.budget_seconds:g}s" if args.budget_seconds else "the gate's default",
           "repeats": args.repeats, "threads": args.threads, "busy_cores": args.busy_cores,
           "summary": summary, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{stamp}-ab-gate-check.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(f"\ngate-check: identical {summary['identical_pass']}/{summary['identical_total']} pass, slower "
          f"{summary['slower_caught']}/{summary['slower_total']} caught, gate wall median {summary['wall_s_median']:.1f}s"
          f" -> {out} (+ .md)")
    return 0 if summary["as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
