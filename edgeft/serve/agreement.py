"""Batch-of-1 vs batched answers of an ONNX model folder over a data split (dynamic int8 picks
one activation scale per batch tensor, so a text's label can depend on its batch-mates).

    python -m edgeft.serve.agreement RUN_DIR [--variant int8] [--split validation] [--n 500] [--batch 32] [--out F]

Writes JSON with the command line and git commit: label agreement of shuffled batches and of
length-sorted batches with batch-of-1, and of both with the fp32 ``optimized`` variant.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from edgeft.data import load_dataset
    from edgeft.recipe import load_recipe
    from edgeft.serve.runner import ModelRunner

    ap = argparse.ArgumentParser(prog="python -m edgeft.serve.agreement")
    ap.add_argument("run_dir")
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--reference", default="optimized", help="fp32 variant to compare with")
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from edgeft.layout import RunLayout, read_side_file

    run = Path(a.run_dir)
    layout = RunLayout(run)
    recipe = load_recipe(layout.recipe)
    split = getattr(load_dataset(recipe.data), a.split)
    idx = list(range(len(split.texts)))
    random.Random(0).shuffle(idx)
    idx = idx[:a.n]
    texts, labels = [split.texts[i] for i in idx], np.asarray(split.labels)[idx]
    max_length = read_side_file(layout.compress / a.variant)["max_length"]

    def answers(variant: str) -> dict[str, np.ndarray]:
        d = run / "compress" / variant
        r = ModelRunner(d, d / "model.onnx", max_length=max_length, threads=1)
        b1 = np.concatenate([r.predict([t])[0] for t in texts]).argmax(-1)
        shuffled = np.concatenate([r.predict(texts[i:i + a.batch])[0] for i in range(0, len(texts), a.batch)]).argmax(-1)
        order = np.argsort([r.encode([t])[0].tokens for t in texts], kind="stable")
        st = [texts[i] for i in order]
        by_len = np.empty(len(texts), dtype=np.int64)
        by_len[order] = np.concatenate([r.predict(st[i:i + a.batch])[0] for i in range(0, len(st), a.batch)]).argmax(-1)
        return {"b1": b1, "batched": shuffled, "batched_length_sorted": by_len}

    got, ref = answers(a.variant), answers(a.reference)
    out = {"command": " ".join([sys.executable, "-m", "edgeft.serve.agreement", *(argv or sys.argv[1:])]),
           "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip(),
           "run_dir": str(run), "variant": a.variant, "reference": a.reference, "split": a.split,
           "texts": len(texts), "batch_size": a.batch}
    for name, ans in ((a.variant, got), (a.reference, ref)):
        out[f"answers_{name}"] = {"agreement_batched_vs_b1": float((ans["batched"] == ans["b1"]).mean()),
                     "agreement_length_sorted_vs_b1": float((ans["batched_length_sorted"] == ans["b1"]).mean()),
                     "agreement_b1_vs_reference_b1": float((ans["b1"] == ref["b1"]).mean()),
                     "agreement_batched_vs_reference_b1": float((ans["batched"] == ref["b1"]).mean()),
                     "accuracy_b1": float((ans["b1"] == labels).mean()),
                     "accuracy_batched": float((ans["batched"] == labels).mean())}
    text = json.dumps(out, indent=2)
    if a.out:
        from edgeft.artifacts import write_text_atomic

        write_text_atomic(a.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
