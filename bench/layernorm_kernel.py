"""ONNX Runtime's CPU (Skip)LayerNormalization kernel vs edgeft's InstanceNormalization rewrite, one node each.

    python bench/layernorm_kernel.py [--shape 1,128,384] [--threads 2] [--repeats 5] [--out bench/results]

Builds tiny one-node models with onnx.helper: ``LayerNormalization`` (opset 17) and ORT's
``com.microsoft.SkipLayerNormalization`` (input + skip + bias, as in a fused BERT graph), each also
rewritten by ``edgeft.export.layernorm_as_instance_norm`` (the function the compress stage's optimizer step
applies with ``optimize.layernorm: instance-norm``). Checks max |diff| between each and its rewrite (and
against a float64 numpy reference), then times them all in one process with the bench's own method
(``edgeft.bench.timing.measure_interleaved``: warm-up, alternating blocks, a 50 ms idle before each block),
``--repeats`` times. Also timed, as floors: an ``Identity`` model of the same shape (the cost of one
``session.run`` with that output) and torch's ``x + skip + bias`` then ``layer_norm`` (when torch is there).
Reports the median per-call microseconds over all repeats, ns per element (per call / elements; the call
overhead included), and the ratio kernel / rewrite; result in OUT/<stamp>-layernorm-kernel.{json,md} with
the command line, git commit, CPU (model, int8 flags) and onnxruntime version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from provenance import markdown_header, provenance, write_result  # noqa: E402

EPS = 1e-12  # BERT's layer_norm_eps


def build_models(shape: tuple[int, ...], seed: int = 0) -> tuple[dict, dict[str, np.ndarray], dict]:
    """ONNX ModelProtos by name (layernorm, skiplayernorm, their rewrites, identity), the feeds, and the
    rewrite counts. gamma / beta / bias are random initializers, so the check covers them."""
    import copy

    from onnx import TensorProto, helper, numpy_helper

    from edgeft.export import layernorm_as_instance_norm

    rng = np.random.default_rng(seed)
    hidden = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 0.5
    skip = rng.standard_normal(shape).astype(np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((gamma, "gamma"), (beta, "beta"), (bias, "bias"))]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("x", "skip", "y")]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]

    def model(nodes, inputs):
        g = helper.make_graph(nodes, "ln", inputs, [vi[2]], initializer=copy.deepcopy(inits))
        return helper.make_model(g, opset_imports=opsets, ir_version=8)

    models = {
        "layernorm": model([helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln",
                                             axis=-1, epsilon=EPS)], vi[:1]),
        "skiplayernorm": model([helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                                                 ["y"], name="sln", domain="com.microsoft", epsilon=EPS)], vi[:2]),
        "identity": model([helper.make_node("Identity", ["x"], ["y"], name="id")], vi[:1]),
    }
    counts = {}
    for name in ("layernorm", "skiplayernorm"):
        rewritten = copy.deepcopy(models[name])
        counts[name] = layernorm_as_instance_norm(rewritten)
        models[f"{name}-as-instancenorm"] = rewritten
    return models, {"x": x, "skip": skip, "gamma": gamma, "beta": beta, "bias": bias}, counts


def reference(arrays: dict[str, np.ndarray], skip: bool) -> np.ndarray:
    t = arrays["x"].astype(np.float64)
    if skip:
        t = t + arrays["skip"] + arrays["bias"]
    mu = t.mean(-1, keepdims=True)
    var = ((t - mu) ** 2).mean(-1, keepdims=True)
    return (t - mu) / np.sqrt(var + EPS) * arrays["gamma"] + arrays["beta"]


def measure(shape: tuple[int, ...] = (1, 128, 384), threads: int = 2, repeats: int = 5, plan=None,
            with_torch: bool = True) -> dict:
    """Build, check and time (see the module docstring). Returns the per-variant figures, the ratios, the
    max |diff|s and the rewrite's node counts."""
    import onnx

    from edgeft.bench.timing import TimingPlan, measure_interleaved
    from edgeft.onnx_eval import make_session

    plan = plan or TimingPlan(target_samples=1000, budget_s=4.0)
    models, arrays, counts = build_models(shape)
    feeds = {"layernorm": {"x": arrays["x"]}, "skiplayernorm": {"x": arrays["x"], "skip": arrays["skip"]},
             "identity": {"x": arrays["x"]}}
    feeds["layernorm-as-instancenorm"], feeds["skiplayernorm-as-instancenorm"] = feeds["layernorm"], feeds["skiplayernorm"]
    fns, outs, ops = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(m, str(path))
            sess = make_session(path, threads=threads)  # the bench's session options (ORT_ENABLE_ALL, inter_op 1)
            outs[name] = sess.run(None, feeds[name])[0]
            ops[name] = [n.op_type for n in m.graph.node]
            fns[f"ort-{name}"] = (lambda s, f: lambda: s.run(None, f))(sess, feeds[name])
    diffs = {}
    for name in ("layernorm", "skiplayernorm"):
        ref = reference(arrays, name == "skiplayernorm")
        diffs[name] = {"kernel_vs_rewrite": float(np.abs(outs[name] - outs[f"{name}-as-instancenorm"]).max()),
                       "kernel_vs_float64": float(np.abs(outs[name] - ref).max()),
                       "rewrite_vs_float64": float(np.abs(outs[f"{name}-as-instancenorm"] - ref).max())}
    torch_version = None
    if with_torch:
        try:
            import torch
        except ImportError:
            with_torch = False
        else:
            torch.set_num_threads(threads)
            tx, ts, tb = (torch.from_numpy(arrays[k]) for k in ("x", "skip", "bias"))
            tg, tbeta = torch.from_numpy(arrays["gamma"]), torch.from_numpy(arrays["beta"])

            def torch_fn():
                with torch.inference_mode():
                    return torch.nn.functional.layer_norm(tx + ts + tb, (shape[-1],), tg, tbeta, EPS)

            torch_version = torch.__version__
            diffs["torch-add-layernorm_vs_float64"] = float(np.abs(torch_fn().numpy() - reference(arrays, True)).max())
            fns["torch-add-layernorm"] = torch_fn

    elements = int(np.prod(shape))
    per_repeat: dict[str, list[float]] = {n: [] for n in fns}
    pooled: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        timings = measure_interleaved(fns, plan)
        for n, t in timings.items():
            per_repeat[n].append(float(np.median(t.samples_ms)) * 1000)
            pooled[n].extend(t.samples_ms)
    variants = {}
    for n in fns:
        us = float(np.median(pooled[n])) * 1000
        variants[n] = {"median_us": us, "ns_per_element": us * 1000 / elements, "samples": len(pooled[n]),
                       "p10_us": float(np.percentile(pooled[n], 10)) * 1000,
                       "p90_us": float(np.percentile(pooled[n], 90)) * 1000,
                       "median_us_per_repeat": per_repeat[n]}
    ratios = {}
    for name in ("layernorm", "skiplayernorm"):
        k, r = per_repeat[f"ort-{name}"], per_repeat[f"ort-{name}-as-instancenorm"]
        each = [a / b for a, b in zip(k, r)]
        ratios[f"{name}_kernel_over_rewrite"] = {
            "median": variants[f"ort-{name}"]["median_us"] / variants[f"ort-{name}-as-instancenorm"]["median_us"],
            "per_repeat_min": min(each), "per_repeat_max": max(each)}
    return {"shape": list(shape), "elements": elements, "threads": threads, "repeats": repeats,
            "plan": plan.describe(), "rewritten_nodes": counts, "ops": ops, "max_abs_diff": diffs,
            "variants": variants, "ratios": ratios, "torch": torch_version}


def markdown(doc: dict) -> str:
    r = doc["result"]
    lines = [f"# ORT (Skip)LayerNormalization kernel vs edgeft's InstanceNormalization rewrite ({doc['created']})", "",
             *markdown_header(doc),
             f"- input {r['shape']} float32 ({r['elements']} elements), {r['threads']} intra-op threads, 1 inter-op, "
             f"ORT_ENABLE_ALL; {r['repeats']} repeats of the bench's interleaved timing (50 ms idle before each block)",
             "", "| variant | median us / call | p10..p90 us | ns / element | per-repeat medians us | samples |",
             "|---|---|---|---|---|---|"]
    for n, v in r["variants"].items():
        lines.append(f"| {n} | {v['median_us']:.1f} | {v['p10_us']:.1f}..{v['p90_us']:.1f} | {v['ns_per_element']:.2f} | "
                     f"{', '.join(f'{x:.1f}' for x in v['median_us_per_repeat'])} | {v['samples']} |")
    lines.append("")
    for n, x in r["ratios"].items():
        lines.append(f"- {n.replace('_', ' ')}: **{x['median']:.2f}x** (per repeat {x['per_repeat_min']:.2f}.."
                     f"{x['per_repeat_max']:.2f}x)")
    for n, d in r["max_abs_diff"].items():
        lines.append(f"- max |diff| {n}: " + (", ".join(f"{k} {v:.2e}" for k, v in d.items())
                                              if isinstance(d, dict) else f"{d:.2e}"))
    lines += [f"- rewritten nodes: {r['rewritten_nodes']}; rewrite's ops: "
              f"{' -> '.join(r['ops']['skiplayernorm-as-instancenorm'])}", "",
              "Per call = one `session.run` (torch: one eager call) including the Python call and output "
              "allocation; `ort-identity` shows that floor. ns / element = per call / elements.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,128,384", help="input shape, comma-separated (default MiniLM's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0, help="timing budget per repeat, all variants together")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    from edgeft.bench.timing import TimingPlan

    shape = tuple(int(s) for s in args.shape.split(","))
    doc = {"schema": "edgeft.layernorm-kernel/1",
           **provenance("bench/layernorm_kernel.py", argv, ("onnxruntime", "onnx", "numpy", "torch"))}
    t0 = time.perf_counter()
    doc["result"] = measure(shape, args.threads, args.repeats, TimingPlan(target_samples=1000, budget_s=args.seconds),
                            with_torch=not args.no_torch)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    out = write_result(doc, args.out, f"{time.strftime('%Y%m%d-%H%M')}-layernorm-kernel", markdown(doc))
    print(markdown(doc))
    print(f"layernorm-kernel: {out} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
