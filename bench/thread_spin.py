"""The thread-spin effect the bench's 50 ms idle gap before each block exists for.

    python bench/thread_spin.py [--threads 2] [--repeats 16] [--gaps 0,10,25,50,100] [--out bench/results]

Two ONNX Runtime sessions (A and B) of one self-contained model built in-process with onnx.helper: an
FFN-shaped ``MatMul -> Relu -> MatMul`` on a [128, 768] input (768 -> 3072 -> 768, float32: ~5 ms per call on
2 cores, about int8 MiniLM's time), each with its own intra-op pool of ``--threads`` threads and the bench's
session options. One trial: a block of A's calls (``--block-ms`` long), then an idle gap of G ms, then B's
first ``--first`` calls, each timed. Conditions, interleaved (the order rotates every repeat): each gap in
``--gaps`` (0 = B right after A's last call); A with spinning off (``session.intra_op.allow_spinning=0``) and
no gap, the control; and B right after a block of its own calls (its own threads are awake, nobody else's
spin). Reports per condition the median over trials of the mean of B's first calls, the first call alone,
and the ratio no gap / 50 ms gap; result in OUT/<stamp>-thread-spin.{json,md} with the command line, git
commit, CPU (model, int8 flags) and onnxruntime version.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from provenance import markdown_header, provenance, write_result  # noqa: E402


def ffn_model(rows: int, hidden: int, ffn: int, seed: int = 0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((hidden, ffn)) / np.sqrt(hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((ffn, hidden)) / np.sqrt(ffn)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")],
        "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, hidden])], initializer=[w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ms(fn) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def measure(threads: int = 2, repeats: int = 16, gaps: tuple[float, ...] = (0, 10, 25, 50, 100),
            first: int = 5, block_ms: float = 150.0, rows: int = 128, hidden: int = 768, ffn: int = 3072) -> dict:
    """Run the trials (see the module docstring); returns per-condition figures and the ratios."""
    import onnx

    from edgeft.onnx_eval import make_session

    if 0 not in gaps or 50 not in gaps:
        gaps = tuple(sorted({0, 50, *gaps}))
    x = np.random.default_rng(1).standard_normal((rows, hidden)).astype(np.float32)
    feed = {"x": x}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ffn.onnx"
        onnx.save(ffn_model(rows, hidden, ffn), str(path))
        a = make_session(path, threads=threads)
        a_nospin = make_session(path, threads=threads, spinning=False)
        b = make_session(path, threads=threads)
    run_a, run_a_nospin, run_b = (lambda: a.run(None, feed)), (lambda: a_nospin.run(None, feed)), (lambda: b.run(None, feed))
    for fn in (run_a, run_a_nospin, run_b):  # warm-up: arenas, first-call costs
        for _ in range(20):
            fn()
    steady = [_ms(run_b) for _ in range(50)]

    conditions: dict[str, tuple] = {f"after A, gap {g:g} ms": (run_a, g) for g in gaps}
    conditions["after A (spinning off), gap 0 ms"] = (run_a_nospin, 0)
    conditions["after B itself, gap 0 ms"] = (run_b, 0)
    names = list(conditions)
    trials: dict[str, list[list[float]]] = {n: [] for n in names}
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    t_start = time.perf_counter()
    try:
        for rep in range(repeats):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                before, gap = conditions[name]
                time.sleep(0.06)  # nothing left spinning from the previous trial
                t_end = time.perf_counter() + block_ms / 1000
                while time.perf_counter() < t_end:
                    before()
                if gap:
                    time.sleep(gap / 1000)
                trials[name].append([_ms(run_b) for _ in range(first)])
    finally:
        if gc_was:
            gc.enable()
    measure_s = time.perf_counter() - t_start

    out = {}
    for name in names:
        means = [float(np.mean(t)) for t in trials[name]]
        out[name] = {"first_n_mean_ms_median": float(np.median(means)),
                     "first_n_mean_ms_min": min(means), "first_n_mean_ms_max": max(means),
                     "first_call_ms_median": float(np.median([t[0] for t in trials[name]])),
                     "per_call_ms_median": [float(np.median([t[i] for t in trials[name]])) for i in range(first)],
                     "trials": len(means)}
    ref = out["after A, gap 50 ms"]["first_n_mean_ms_median"]
    nogap = out["after A, gap 0 ms"]["first_n_mean_ms_median"]
    settled = next((g for g in sorted(gaps) if out[f"after A, gap {g:g} ms"]["first_n_mean_ms_median"]
                    <= 1.10 * out[f"after A, gap {max(gaps):g} ms"]["first_n_mean_ms_median"]), None)
    return {"threads": threads, "repeats": repeats, "gaps_ms": list(gaps), "first": first, "block_ms": block_ms,
            "model": {"ops": "MatMul -> Relu -> MatMul", "input": [rows, hidden], "ffn": ffn},
            "b_steady_ms_median": float(np.median(steady)), "conditions": out,
            "ratio_no_gap_over_gap_50": nogap / ref,
            "ratio_no_gap_spinning_off_over_gap_50": out["after A (spinning off), gap 0 ms"]["first_n_mean_ms_median"] / ref,
            "smallest_gap_within_10pct_of_largest_ms": settled, "measure_s": round(measure_s, 1)}


def markdown(doc: dict) -> str:
    r = doc["result"]
    lines = [f"# ORT thread spin: session B's first calls right after session A ({doc['created']})", "",
             *markdown_header(doc),
             f"- model: {r['model']['ops']}, input {r['model']['input']} float32, FFN {r['model']['ffn']}; "
             f"{r['threads']} intra-op threads per session, 1 inter-op; B alone, steady: {r['b_steady_ms_median']:.2f} ms",
             f"- trial: {r['block_ms']:g} ms block of A's calls, gap, B's first {r['first']} calls timed; "
             f"{r['repeats']} trials per condition, conditions interleaved",
             "", f"| condition | B first-{r['first']} mean ms (median) | min..max | first call ms | per call ms (medians) |",
             "|---|---|---|---|---|"]
    for n, c in r["conditions"].items():
        lines.append(f"| {n} | {c['first_n_mean_ms_median']:.2f} | {c['first_n_mean_ms_min']:.2f}..{c['first_n_mean_ms_max']:.2f} | "
                     f"{c['first_call_ms_median']:.2f} | {', '.join(f'{x:.2f}' for x in c['per_call_ms_median'])} |")
    lines += ["", f"- no gap / 50 ms gap: **{r['ratio_no_gap_over_gap_50']:.2f}x**; with A's spinning off, no gap / "
              f"50 ms gap: {r['ratio_no_gap_spinning_off_over_gap_50']:.2f}x",
              f"- smallest gap within 10% of the {max(r['gaps_ms']):g} ms gap: {r['smallest_gap_within_10pct_of_largest_ms']} ms", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--gaps", default="0,10,25,50,100", help="idle gaps in ms (0 and 50 always included)")
    ap.add_argument("--first", type=int, default=5, help="B's calls timed per trial")
    ap.add_argument("--block-ms", type=float, default=150.0, help="length of A's block (the bench's block_ms)")
    ap.add_argument("--hidden", type=int, default=768, help="model width (input [128, hidden])")
    ap.add_argument("--ffn", type=int, default=3072, help="inner width of the MatMul -> Relu -> MatMul model")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    doc = {"schema": "edgeft.thread-spin/1", **provenance("bench/thread_spin.py", argv)}
    t0 = time.perf_counter()
    doc["result"] = measure(args.threads, args.repeats, tuple(float(g) for g in args.gaps.split(",")), args.first,
                            args.block_ms, hidden=args.hidden, ffn=args.ffn)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    out = write_result(doc, args.out, f"{time.strftime('%Y%m%d-%H%M')}-thread-spin", markdown(doc))
    print(markdown(doc))
    print(f"thread-spin: {out} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
