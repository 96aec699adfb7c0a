"""Demonstrate the gate on the suite's models: repeated runs must not raise a false alarm, a run with one
intra-op thread instead of two (every model ~1.5-2x slower) must.

    python bench/gate_check.py [--make-baseline] [--repeats 5] [--work runs/suite]

Needs the suite's compress outputs (``make bench`` first). Without a baseline at --baseline (or with
--make-baseline) one is benched and stored first. Each repeat benches the same models in a fresh process
(``edgeft.bench`` in a subprocess: a fresh process per run is what CI does) and runs
``edgeft gate CURRENT --baseline BASELINE``. Exit 0 when every repeat passed and the 1-thread run was caught.
Shorter timing budgets than the suite (--max-seconds) keep a check to about a minute per run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


RUNNER = """
import sys, json
from pathlib import Path
sys.path.insert(0, {bench_dir!r})
import suite
from edgeft.bench import bench_models
from edgeft.data import load_dataset
from edgeft.recipe import BenchConfig
run, work, out, threads, secs, n_eval = Path({run!r}), Path({work!r}), Path({out!r}), {threads}, {secs}, {n_eval}
compressed = {{k: work / k for k in ("int8", "pruned-int8")}} | {{"optimum": work / "optimum"}}
specs = suite.suite_specs(run, compressed)
recipe = suite._recipe(run, [])
dataset = load_dataset(recipe.data, seed=recipe.seed)
cfg = BenchConfig(batch_sizes=[1], seq_lengths=[128], threads=threads, runtimes=["torch-cpu", "ort-cpu"],
                  max_seconds_per_variant=secs, min_samples=100, max_eval_samples=n_eval)
bench_models(specs, cfg, dataset, out, reference=suite.REFERENCE, show_progress=False,
             title="gate check: MiniLM suite, %d threads" % threads)
"""


def bench_once(run: Path, work: Path, out: Path, threads: int, secs: float, n_eval: int) -> Path:
    if out.exists():
        shutil.rmtree(out)
    code = RUNNER.format(bench_dir=str(Path(__file__).resolve().parent), run=str(run), work=str(work), out=str(out),
                         threads=threads, secs=secs, n_eval=n_eval)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    print(f"  benched {out} (intra-op threads: {threads}) in {time.perf_counter() - t0:.0f}s", flush=True)
    return out / "bench.json"


def gate_cli(current: Path, baseline: Path, *extra: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "edgeft.cli", "gate", str(current), "--baseline", str(baseline), *extra],
                       capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="fine-tuned run folder (default: as bench/suite.py)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "suite")
    ap.add_argument("--baseline", type=Path, default=ROOT / "bench" / "baselines" / "minilm-suite-gate.json")
    ap.add_argument("--make-baseline", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=6.0)
    ap.add_argument("--max-eval-samples", type=int, default=500)
    ap.add_argument("--threshold", default="10%")
    ap.add_argument("--scratch", type=Path, default=ROOT / "runs" / "gate-check")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    run = args.run or args.work / "finetune"
    if not args.run and not (run / "finetuned").is_dir():
        run = ROOT / "runs" / "ft-default"
    for need in ("int8", "pruned-int8"):
        if not (args.work / need / "compress" / "report.json").is_file():
            print(f"gate-check: {args.work / need} missing: run 'make bench' (bench/suite.py) first", file=sys.stderr)
            return 2
    bench = lambda name, threads: bench_once(run, args.work, args.scratch / name, threads,  # noqa: E731
                                             args.max_seconds, args.max_eval_samples)
    if args.make_baseline or not args.baseline.is_file():
        print(f"gate-check: benching a baseline -> {args.baseline}")
        src = bench("baseline", 2)
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, args.baseline)

    rows = []
    for i in range(1, args.repeats + 1):
        cur = bench(f"repeat-{i}", 2)
        rc, text = gate_cli(cur, args.baseline, "--max-latency-regression", args.threshold)
        rows.append({"run": f"repeat {i} (2 threads)", "expected": 0, "exit": rc, "output": text})
        print(text.splitlines()[0] if text else f"exit {rc}", flush=True)
    cur = bench("one-thread", 1)
    rc, text = gate_cli(cur, args.baseline, "--max-latency-regression", args.threshold)
    rows.append({"run": "1 thread instead of 2", "expected": 1, "exit": rc, "output": text})
    print(text, flush=True)

    print("\ngate-check summary:")
    for r in rows:
        print(f"  {r['run']:<24} exit {r['exit']} (expected {r['expected']}): "
              f"{'as expected' if r['exit'] == r['expected'] else 'UNEXPECTED'}")
    good = all(r["exit"] == r["expected"] for r in rows)
    out = args.results / f"{time.strftime('%Y%m%d-%H%M')}-gate-check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"baseline": str(args.baseline), "threshold": args.threshold, "rows": rows,
                               "as_expected": good}, indent=2) + "\n")
    print(f"  -> {out}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
