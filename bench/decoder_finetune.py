"""The decoder fine-tune stage measured on the built-in recipe (`make decoder-finetune`): issue 11's target
is validation perplexity at least 20% lower within 15 minutes on 2 cores.

    python bench/decoder_finetune.py [--recipe recipes/smollm2-shakespeare.yaml] [--set KEY=VALUE]...

Runs `edgeft run RECIPE --set stages=[finetune]` into runs/decoder-finetune/ (replaced each time), then
records the run's finetuned/metrics.json (method, settings, validation perplexity before / after / per
epoch, steps, tokens/s, wall seconds) and the greedy continuations before and after, with the command
line, git commit and CPU: bench/results/<stamp>-decoder-finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import markdown_header, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = {"perplexity_drop": 0.20, "minutes": 15.0}


def render_md(r: dict) -> str:
    m = r["metrics"]
    before, after = m["validation"]["before"]["perplexity"], m["validation"]["after"]["perplexity"]
    drop = 1 - after / before
    minutes = r["wall_s"] / 60
    ok = drop >= TARGET["perplexity_drop"] and minutes <= TARGET["minutes"]
    lines = [f"# Decoder fine-tune on the built-in recipe ({r['created']})", "", *markdown_header(r), "",
             f"- recipe: `{r['recipe']}` with `--set stages=[finetune]`{' ' + ' '.join(r['overrides']) if r['overrides'] else ''}",
             f"- method: {m.get('method')}; trainable parameters: {m.get('trainable_params')} of {m.get('params')}",
             f"- validation perplexity: **{before:.2f} -> {after:.2f} ({-drop:+.1%})**",
             f"- wall time of the whole `edgeft run` (load, tokenize, train, evaluate, merge, save): **{minutes:.1f} min**",
             f"- target (issue 11): >= {TARGET['perplexity_drop']:.0%} lower within {TARGET['minutes']:g} min: "
             f"**{'met' if ok else 'missed'}**", "",
             "```json", json.dumps({k: m[k] for k in m if k not in ("generations",)}, indent=1)[:4000], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/decoder_finetune.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-shakespeare.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "decoder-finetune")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    from edgeft.artifacts import write_text_atomic

    result = {**provenance("bench/decoder_finetune.py", argv, ("torch", "transformers", "peft")),
              "recipe": a.recipe, "overrides": a.overrides}
    cmd = [sys.executable, "-m", "edgeft.cli", "run", a.recipe, "--set", "stages=[finetune]", "--out", str(a.work),
           "--force", "--quiet"] + [x for o in a.overrides for x in ("--set", o)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT)
    result["wall_s"] = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"decoder-finetune: edgeft run exited {proc.returncode}")
    result["metrics"] = json.loads((a.work / "finetuned" / "metrics.json").read_text())
    gen = a.work / "finetuned" / "generations.json"
    result["generations"] = json.loads(gen.read_text()) if gen.is_file() else None
    stamp = time.strftime("%Y%m%d-%H%M")
    a.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out / f"{stamp}-decoder-finetune.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(a.out / f"{stamp}-decoder-finetune.md", render_md(result))
    print(render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
