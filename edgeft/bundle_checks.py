"""Measurements shared by ``edgeft ship`` (which records them) and ``edgeft verify`` (which repeats them).

- Golden answers: the bundle's model through the serving path (``edgeft.serve.runner.ModelRunner``: the
  bundle's fast tokenizer, one ONNX Runtime session), one text per call (batch size 1, so no answer
  depends on batch-mates).
- Latency with machine normalisation: a bundle's recorded latency comes from another machine, so the
  model is timed interleaved with a fixed reference workload (an fp32 two-layer MatMul MLP in ONNX
  Runtime, same thread count), and what is compared across machines is the ratio model / reference.
  Interleaving is edgeft.bench.timing's; the decision is edgeft.gate's (median ratio, bootstrap CI).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The reference workload: x[ROWS, D] @ W1[D, H] -> Relu -> @ W2[H, D]; fixed sizes and seed, so it
# is the same work on every machine (~0.3 GFLOP: a few ms on a 2-core server, close to a small
# classifier's time, so both see the same cache and frequency state).
REF_ROWS, REF_D, REF_H, REF_SEED = 128, 384, 1536, 0
REFERENCE_DESCRIPTION = (f"fp32 MLP in ONNX Runtime: [{REF_ROWS},{REF_D}] @ [{REF_D},{REF_H}] -> Relu -> "
                         f"@ [{REF_H},{REF_D}], seed {REF_SEED}")
LATENCY_INPUT = "the golden texts joined by spaces, tokenized and truncated to max_length, batch 1"


def open_runner(model_dir: Path, onnx_path: Path, max_length: int, threads: int | None = None):
    """The serving path's runner (tokenizer.json + ORT session) for a bundle's model folder."""
    from edgeft.serve.runner import ModelRunner

    return ModelRunner(model_dir, onnx_path, max_length=max_length, threads=threads)


def predict_one_by_one(runner, texts: list[str]) -> np.ndarray:
    """Logits [len(texts), C], one text per session call."""
    rows = [runner.run_encoded(runner.encode([t]))[0] for t in texts]
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), dtype=np.float32)


def read_golden(path: Path) -> list[dict[str, Any]]:
    from edgeft.bundle import BundleError

    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            ok = (isinstance(row, dict) and isinstance(row.get("text"), str) and isinstance(row.get("label"), str)
                  and isinstance(row.get("logits"), list) and all(isinstance(x, (int, float)) for x in row["logits"]))
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise BundleError(f"{path} line {n} is not a golden example (text, label, logits)", "re-ship the bundle")
        rows.append(row)
    return rows


@dataclass
class GoldenResult:
    n: int
    label_mismatches: list[int]  # indices whose label differs beyond a near-tie
    near_ties_flipped: list[int]  # label differs, but the golden margin was within the tolerance
    logit_failures: list[int]  # indices whose logits differ beyond atol
    max_abs_diff: float
    atol: float

    @property
    def ok(self) -> bool:
        return not self.label_mismatches and not self.logit_failures

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "label_mismatches": self.label_mismatches[:20],
                "label_mismatch_count": len(self.label_mismatches), "near_ties_flipped": self.near_ties_flipped[:20],
                "logit_failures": self.logit_failures[:20], "logit_failure_count": len(self.logit_failures),
                "max_abs_logit_diff": self.max_abs_diff, "logits_atol": self.atol}


def compare_golden(golden: list[dict[str, Any]], labels: list[str], logits: np.ndarray, atol: float) -> GoldenResult:
    """Same labels (a flip is excused only where the golden top-2 margin is within ``atol``, a true tie
    within the tolerance) and every logit within ``atol``."""
    expected = np.asarray([g["logits"] for g in golden], dtype=np.float64)
    if expected.shape != logits.shape:
        return GoldenResult(len(golden), list(range(len(golden))), [], list(range(len(golden))), math.inf, atol)
    diff = np.abs(expected - logits).max(axis=1) if len(golden) else np.zeros(0)
    got = [labels[i] for i in logits.argmax(axis=1)] if len(golden) else []
    mismatch, ties = [], []
    for i, g in enumerate(golden):
        if got[i] != g["label"]:
            top2 = np.sort(expected[i])[-2:]
            (ties if top2[1] - top2[0] <= atol else mismatch).append(i)
    return GoldenResult(len(golden), mismatch, ties, [int(i) for i in np.flatnonzero(diff > atol)],
                        float(diff.max()) if diff.size else 0.0, atol)


def latency_encoding(runner, texts: list[str]):
    """The fixed latency-check input (see LATENCY_INPUT): identical on every machine for one bundle."""
    return runner.encode([" ".join(texts)])


def _reference_session(threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(REF_SEED)
    w1 = (rng.standard_normal((REF_D, REF_H)) / math.sqrt(REF_D)).astype(np.float32)
    w2 = (rng.standard_normal((REF_H, REF_D)) / math.sqrt(REF_H)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "edgeft_reference",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [REF_ROWS, REF_D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [REF_ROWS, REF_D])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((REF_ROWS, REF_D)).astype(np.float32)
    return lambda: sess.run(None, {"x": x})


def measure_latency(runner, encoding, *, threads: int, budget_s: float) -> dict[str, Any]:
    """Time the model (batch 1 on ``encoding``) and the reference workload interleaved.

    Returns raw samples (ms) of both and a summary; ``budget_s`` caps the measuring rounds.
    """
    from edgeft.bench.stats import summarize
    from edgeft.bench.timing import TimingPlan, measure_interleaved

    ref = _reference_session(threads)
    plan = TimingPlan(min_samples=60, target_samples=600, budget_s=budget_s, warmup_min_s=0.3,
                      warmup_max_s=max(1.0, budget_s / 3))
    timings = measure_interleaved({"model": lambda: runner.run_encoded(encoding), "reference": ref}, plan)
    out: dict[str, Any] = {"threads": threads, "tokens": encoding[0].tokens, "plan": plan.describe()}
    for name, t in timings.items():
        s = summarize(t.samples_ms)
        out[name] = {"p50_ms": s["p50"], "p90_ms": s["p90"], "p99_ms": s["p99"], "n": s["n"],
                     "cv_robust": s["cv_robust"], "samples_ms": [round(x, 4) for x in t.samples_ms]}
    out["ratio_p50"] = out["model"]["p50_ms"] / out["reference"]["p50_ms"]
    return out
