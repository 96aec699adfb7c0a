"""The project's own bench suite: fine-tuned MiniLM on Rotten Tomatoes, side by side in one process.

    python bench/suite.py [--run RUN_DIR] [--work runs/suite] [--out bench/results]

Variants (batch 1, seq 128, 2 intra-op threads unless told otherwise):
  torch-fp32          the fine-tuned model, PyTorch eager (the reference for every ratio)
  ort-fp32            edgeft's plain ONNX export on ONNX Runtime CPU
  edgeft-int8         edgeft compress without pruning (--set compress.prune=null)
  edgeft-pruned-int8  edgeft compress with the recipe's defaults (structured pruning + int8)
  optimum-int8        the plain optimum path (optimum export + avx512_vnni dynamic per-channel int8)

Compress outputs are cached under --work and reused unless --fresh. Without --run a fine-tuned run folder is
made with ``edgeft finetune recipes/minilm-rotten-tomatoes.yaml`` into WORK/finetune (reused when there).
Results: OUT/<date>-suite.{json,md,png}, with the compress targets checked (int8 >= 3x, pruned+int8 >= 4.5x
vs torch fp32, pruned+int8 faster than the optimum path), the command line, the git commit and the path + sha256
of each compress/report.json measured (``provenance``). Run it under ``flock /tmp/edgeft-heavy.lock`` on a
shared machine (``make bench`` does).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "minilm-rotten-tomatoes.yaml"
REFERENCE = "torch-fp32"
TARGETS = {"edgeft-int8": 3.0, "edgeft-pruned-int8": 4.5}  # speed-up vs torch fp32 at b1 s128, 2 threads


def _recipe(run_dir: Path, overrides: list[str]):
    """The fine-tune run's data and seed, with the project's current compress settings (the suite measures
    what the default recipe does today, not what it did when the checkpoint was made)."""
    from edgeft.recipe import load_recipe

    recipe = load_recipe(DEFAULT_RECIPE, overrides)
    if (run_dir / "recipe.yaml").is_file():
        ran = load_recipe(run_dir / "recipe.yaml")
        recipe = recipe.model_copy(update={"data": ran.data, "seed": ran.seed})
    return recipe


def ensure_finetuned(run: Path | None, work: Path) -> Path:
    from edgeft.pipeline import finetune_stage
    from edgeft.recipe import load_recipe

    if run is not None:
        return run
    run = work / "finetune"
    if (run / "finetuned" / "config.json").is_file():
        return run
    print(f"suite: no --run given; fine-tuning {DEFAULT_RECIPE.name} into {run} (about 12 minutes on 2 cores)")
    return finetune_stage(load_recipe(DEFAULT_RECIPE), run, force=True)


def ensure_compressed(run: Path, work: Path, *, fresh: bool) -> dict[str, Path]:
    """Compress twice (no pruning; recipe defaults) and the optimum path; reuse what is there."""
    from edgeft.pipeline import compress_stage

    out = {}
    for name, overrides in (("int8", ["compress.prune=null"]), ("pruned-int8", [])):
        target = work / name
        if fresh or not (target / "compress" / "report.json").is_file():
            print(f"suite: edgeft compress {run} {' '.join('--set ' + o for o in overrides)} -> {target}")
            t0 = time.perf_counter()
            # allow_miss: the suite reports speed and accuracy either way; the verdict is in the report.
            compress_stage(run, _recipe(run, overrides + ["compress.allow_miss=true"]), target, force=True)
            print(f"suite: compress {name} took {time.perf_counter() - t0:.0f}s")
        out[name] = target
    opt = work / "optimum"
    if fresh and opt.exists():
        shutil.rmtree(opt)
    if not (opt / "model.onnx").is_file():
        try:
            from edgeft.quantize import optimum_baseline
        except ImportError:  # older layout
            from edgeft.compress import optimum_baseline
        print(f"suite: plain optimum path -> {opt}")
        if opt.exists():
            shutil.rmtree(opt)
        optimum_baseline(run / "finetuned", opt)
    out["optimum"] = opt
    return out


def suite_specs(run: Path, compressed: dict[str, Path]) -> list:
    import json

    from edgeft.bench.models import hf_spec, onnx_spec

    def artifact(folder: Path, key: str) -> Path:
        report = json.loads((folder / "compress" / "report.json").read_text())
        rel = (report.get("artifacts") or {}).get(key)
        if not rel:
            raise SystemExit(f"suite: {folder}/compress/report.json has no '{key}' artifact")
        p = folder / "compress" / rel
        return p / "model.onnx" if p.is_dir() else p

    ft = run / "finetuned"
    return [
        hf_spec(ft, REFERENCE, str(run)),
        onnx_spec(artifact(compressed["int8"], "onnx_fp32"), "ort-fp32", str(compressed["int8"]), ft),
        onnx_spec(artifact(compressed["int8"], "onnx_int8"), "edgeft-int8", str(compressed["int8"]), ft),
        onnx_spec(artifact(compressed["pruned-int8"], "onnx_int8"), "edgeft-pruned-int8",
                  str(compressed["pruned-int8"]), ft),
        onnx_spec(compressed["optimum"] / "model.onnx", "optimum-int8", str(compressed["optimum"]), ft),
    ]


def check_targets(report: dict) -> dict:
    """Speed-ups vs torch fp32 at b1 s128 and the targets; pruned+int8 vs optimum on the raw samples."""
    from edgeft.bench.stats import bootstrap_ratio_ci

    ok = {r["model"]: r for r in report["results"]
          if r["status"] == "ok" and r["batch"] == 1 and r["seq"] == 128 and r["runtime"] == "ort-cpu"
          or r["status"] == "ok" and r["model"] == REFERENCE and r["batch"] == 1 and r["seq"] == 128}
    out: dict = {"speedup_vs_torch_fp32": {m: r.get("speedup_vs_reference") for m, r in ok.items()}, "checks": []}
    for model, target in TARGETS.items():
        got = ok.get(model, {}).get("speedup_vs_reference")
        out["checks"].append({"check": f"{model} >= {target}x vs torch fp32", "value": got,
                              "met": got is not None and got >= target})
    for model in ("edgeft-pruned-int8", "edgeft-int8"):
        if model in ok and "optimum-int8" in ok:
            point, lo, hi = bootstrap_ratio_ci(ok["optimum-int8"]["samples_ms"], ok[model]["samples_ms"])
            out["checks"].append({"check": f"{model} faster than optimum-int8 (p50 ratio, 95% CI)",
                                  "value": point, "ci": [lo, hi], "met": hi < 1.0})
    return out


def measured_with(argv: list[str] | None, compressed: dict[str, Path]) -> dict:
    """The command line, git commit (+ dirty flag, changed paths) and the path + sha256 of each
    compress/report.json whose models the suite measures (and which variants came from it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import command_line, compress_report, git_state

    uses = {"int8": ["ort-fp32", "edgeft-int8"], "pruned-int8": ["edgeft-pruned-int8"]}
    return {"command": command_line("bench/suite.py", argv), **git_state(),
            "compress_reports": [{**compress_report(compressed[k] / "compress" / "report.json"), "variants": v}
                                 for k, v in uses.items() if k in compressed]}


def provenance_lines(made_with: dict) -> list[str]:
    from provenance import markdown_header

    return markdown_header(made_with, machine=False)  # the CPU and versions are in the table's header


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="fine-tuned run folder (holds finetuned/)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "suite", help="cache of compress outputs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="bench.max_seconds_per_variant")
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="re-run compress even when cached")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from edgeft.bench import bench_models
    from edgeft.data import load_dataset
    from edgeft.errors import EdgeftError
    from edgeft.recipe import BenchConfig

    try:
        run = ensure_finetuned(args.run, args.work)
        compressed = ensure_compressed(run, args.work, fresh=args.fresh)
        made_with = measured_with(argv, compressed)  # before the bench: the tree and reports it measured
        specs = suite_specs(run, compressed)
        recipe = _recipe(run, [])
        dataset = load_dataset(recipe.data, seed=recipe.seed)
        cfg = BenchConfig(batch_sizes=[1], seq_lengths=[128], threads=args.threads, runtimes=["torch-cpu", "ort-cpu"],
                          max_seconds_per_variant=args.max_seconds, max_eval_samples=args.max_eval_samples)
        stem = f"{time.strftime('%Y%m%d-%H%M')}-suite"
        report = bench_models(specs, cfg, dataset, args.out, stem=stem, reference=REFERENCE,
                              title="edgeft suite: fine-tuned MiniLM-L6, Rotten Tomatoes", show_progress=not args.quiet)
    except EdgeftError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    report["suite"] = check_targets(report)
    report["provenance"] = made_with
    from edgeft.bench.report import write_outputs

    write_outputs(report, args.out, stem)  # again, now with the targets
    from edgeft.artifacts import write_text_atomic

    md = args.out / f"{stem}.md"
    write_text_atomic(md, md.read_text() + "\n".join(["", "Made with:", *provenance_lines(made_with), ""]))
    print(f"\nsuite: {args.out / (stem + '.md')}")
    for m, x in report["suite"]["speedup_vs_torch_fp32"].items():
        print(f"  {m:<20} {x:.2f}x vs torch fp32" if x else f"  {m:<20} -")
    for c in report["suite"]["checks"]:
        ci = f" (CI {c['ci'][0]:.2f}..{c['ci'][1]:.2f})" if c.get("ci") else ""
        print(f"  [{'met' if c['met'] else 'MISSED'}] {c['check']}: {c['value']:.2f}{ci}" if c["value"] is not None
              else f"  [MISSED] {c['check']}: not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
