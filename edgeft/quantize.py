"""int8 quantization with ONNX Runtime: dynamic (weights per channel by default) and static QDQ
with calibration; per-node sensitivity to pick the MatMuls to keep in fp32; and the plain
optimum path used as a benchmark baseline.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import DataError, ModelError, RunDirError
from edgeft.export import ONNX_NAME, copy_side_files, op_counts, quiet_logs
from edgeft.safeio import load_onnx_checked

MIN_CALIBRATION_SAMPLES = 16
# Nodes whose weights the sensitivity search may keep in fp32 (MatMul and the fused QKV Attention).
SENSITIVE_OPS = ("MatMul", "Attention")
STATIC_OPS = ("MatMul", "Gather")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WEIGHT_TYPES = ("s8", "u8")


def _quiet() -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


def quantizable_nodes(onnx_path: str | Path) -> list[str]:
    """Names of MatMul/Attention nodes whose second input is a weight initializer (what int8 replaces)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in SENSITIVE_OPS and len(n.input) > 1 and n.input[1] in inits:
            if not n.name:
                continue  # the quantizer addresses nodes by name
            out.append(n.name)
    return out


def _weight_type(name: str):
    from onnxruntime.quantization import QuantType

    if name not in WEIGHT_TYPES:
        raise ModelError(f"unknown int8 weight type '{name}'", f"use one of {', '.join(WEIGHT_TYPES)}")
    return QuantType.QInt8 if name == "s8" else QuantType.QUInt8


def quantize_dynamic(src: str | Path, dst: str | Path, *, per_channel: bool = True, reduce_range: bool = False,
                     exclude: Iterable[str] = (), only: Iterable[str] | None = None, weight_type: str = "s8") -> Path:
    """Dynamic int8: weights quantized offline (``weight_type`` s8 or u8, per output channel by default),
    activations (u8) quantized on the fly. Quantizes MatMul, fused Attention, Gather/EmbedLayerNormalization
    tables. ``reduce_range`` quantizes weights to 7 bits (the u8s8 saturation remedy on CPUs without VNNI)."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    _quiet()
    src, dst = Path(src), Path(dst)
    load_onnx_checked(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with quiet_logs():
        ort_quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=_weight_type(weight_type), nodes_to_exclude=list(exclude) or None,
                             nodes_to_quantize=list(only) if only is not None else None,
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst


class _Reader:
    """CalibrationDataReader over tokenized samples, one sample (batch 1, padded to max_length) per call."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # not needed by ORT's single pass, kept for the protocol
        pass


def calibration_feeds(onnx_path: str | Path, tokenizer, texts: list[str], *, max_length: int) -> list[dict]:
    from edgeft.onnx_eval import feeds_for, make_session
    from edgeft.train import collate, tokenize

    session = make_session(onnx_path, threads=1, optimize=False)
    pad_id = tokenizer.pad_token_id or 0
    # Every sample padded to max_length: the histogram calibrators (entropy, percentile) stack
    # activations across samples and need one shape.
    pad_to = {"input_ids": max_length}
    out = []
    for f in tokenize(tokenizer, texts, max_length):
        f = {k: list(v) + [pad_id if k == "input_ids" else 0] * (pad_to["input_ids"] - len(v)) for k, v in f.items()}
        out.append(feeds_for(session, collate([f], pad_id)))
    return out


def quantize_static(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]], *,
                    method: str = "minmax", per_channel: bool = True, reduce_range: bool = False,
                    exclude: Iterable[str] = (), only: Iterable[str] | None = None, weight_type: str = "s8") -> Path:
    """Static int8 in QDQ format: activation ranges calibrated on ``feeds`` (MinMax/Entropy/Percentile),
    u8 activations and s8 weights (the VNNI-friendly combination)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    _quiet()
    if method not in CALIBRATION_METHODS:
        raise ModelError(f"unknown calibration method '{method}'", f"use one of {', '.join(CALIBRATION_METHODS)}")
    if len(feeds) < MIN_CALIBRATION_SAMPLES:
        raise DataError(f"calibration set too small: {len(feeds)} samples (at least {MIN_CALIBRATION_SAMPLES})",
                        "raise compress.quantize.calibration.samples or use more training data")
    src, dst = Path(src), Path(dst)
    load_onnx_checked(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]
    with quiet_logs():
        ort_quantize_static(str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=_weight_type(weight_type),
                            nodes_to_exclude=list(exclude) or None,
                            nodes_to_quantize=list(only) if only is not None else None,
                            # Weighted ops only: histogram calibrators fail on constant tensors elsewhere
                            # (masks), and int8 Add/Softmax/LayerNorm cost accuracy for little speed.
                            op_types_to_quantize=list(STATIC_OPS),
                            calibrate_method=cm, calibration_cache_path=None,
                            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False,
                                           "CalibTensorRangeSymmetric": False},
                            use_external_data_format=False,
                            calibration_providers=["CPUExecutionProvider"])
    return dst


def node_sensitivity(quantize_fn: Callable[..., Path], src: Path, nodes: list[str],
                     score_fn: Callable[[Path], float], work_dir: Path) -> dict[str, float]:
    """Quantize one node at a time (everything else fp32) and score the damage with ``score_fn``
    (higher = worse, e.g. KL of logits vs fp32 on validation). Returns node -> score."""
    scores = {}
    for name in nodes:
        path = work_dir / "sensitivity.onnx"
        quantize_fn(src, path, only=[name])
        scores[name] = float(score_fn(path))
        path.unlink(missing_ok=True)
    return scores


def exclusion_steps(budget: int) -> list[int]:
    """How many of the most sensitive nodes to keep fp32 on successive retries: 1, 2, 4, ..., budget."""
    steps, k = [], 1
    while k < budget:
        steps.append(k)
        k *= 2
    if budget > 0:
        steps.append(budget)
    return steps


def optimum_baseline(model_dir: Path, out_dir: Path) -> Path:
    """The plain optimum path: optimum's ONNX export (fp32) + ``ORTQuantizer`` with
    ``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)``.

    Writes ``out_dir/model.onnx`` (int8) with config/tokenizer/edgeft.json beside it; ``out_dir``
    must not exist or be empty. Returns the model path."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from edgeft.artifacts import atomic_dir
    from edgeft.export import export_onnx
    from edgeft.safeio import check_hf_folder

    _quiet()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_hf_folder(model_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RunDirError(f"{out_dir} already exists", "pass a new folder for the optimum baseline")
    if out_dir.exists():
        out_dir.rmdir()
    with atomic_dir(out_dir) as tmp:
        fp32 = export_onnx(model_dir, tmp / "fp32")
        quantizer = ORTQuantizer.from_pretrained(str(fp32.parent), file_name=ONNX_NAME)
        qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
        with quiet_logs():
            produced = quantizer.quantize(quantization_config=qconfig, save_dir=str(tmp / "q"))
        produced = Path(produced)
        candidates = sorted(produced.glob("*.onnx")) if produced.is_dir() else [produced]
        if not candidates:
            raise ModelError("optimum's quantizer produced no model", "check the optimum installation")
        shutil.move(str(candidates[0]), tmp / ONNX_NAME)
        shutil.rmtree(tmp / "q", ignore_errors=True)
        shutil.rmtree(tmp / "fp32", ignore_errors=True)
        copy_side_files(model_dir, tmp)
        load_onnx_checked(tmp / ONNX_NAME)
    return out_dir / ONNX_NAME


def quantized_op_summary(path: str | Path) -> dict[str, int]:
    counts = op_counts(path)
    keys = ("MatMulInteger", "DynamicQuantizeLinear", "QAttention", "QEmbedLayerNormalization", "QuantizeLinear",
            "DequantizeLinear", "MatMul", "Attention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
    return {k: counts[k] for k in keys if k in counts}


# ---------------------------------------------------------------- the compress stage's int8 step

SENSITIVITY_SAMPLES = 256  # validation samples used to score each node (KL of logits vs the float parent)


@dataclass(frozen=True)
class Int8Scheme:
    """One way to quantize: u8 activations with s8 or u8 weights, full or reduced (7-bit) weight range."""

    name: str
    weight_type: str
    reduce_range: bool
    why: str

    def describe(self) -> dict:
        return {"scheme": self.name, "weights": self.weight_type, "activations": "u8",
                "reduce_range": self.reduce_range, "why": self.why}


def cpu_int8_info() -> dict:
    """The CPU's int8 capabilities (model, int8/bf16 flags, VNNI, AMX) as ``edgeft.artifacts.cpu_info`` finds them."""
    from edgeft.artifacts import cpu_info

    info = cpu_info()
    return {k: info.get(k) for k in ("model", "flags", "has_vnni", "has_amx_int8")}


def int8_schemes(reduce_range: bool, cpu: dict) -> tuple[list[Int8Scheme], str]:
    """The schemes to try, the configured one first, and why.

    With VNNI (or AMX int8) u8s8 products accumulate without saturation: only the configured scheme.
    Without it ONNX Runtime's x86-64 u8s8 kernels use VPMADDUBSW, whose int16 intermediate sums can
    saturate; ORT's quantization docs name two remedies, ``reduce_range`` (7-bit weights) and u8u8.
    Both are tried too and the choice is made on validation accuracy."""
    configured = Int8Scheme("u8s8-reduce-range" if reduce_range else "u8s8", "s8", reduce_range,
                            "configured (compress.quantize)")
    if cpu.get("has_vnni") or cpu.get("has_amx_int8"):
        return [configured], "the CPU has VNNI/AMX int8 (no u8s8 saturation): the configured scheme only"
    out = [configured]
    if not reduce_range:
        out.append(Int8Scheme("u8s8-reduce-range", "s8", True,
                              "7-bit weights keep VPMADDUBSW's int16 sums from saturating"))
    out.append(Int8Scheme("u8u8", "u8", False, "u8 weights take the u8u8 kernels, which do not saturate"))
    return out, ("the CPU lacks VNNI (flags: " + (", ".join(cpu.get("flags") or []) or "none") + "): ONNX Runtime "
                 "documents that u8s8 may saturate there (use reduce_range or u8u8); the documented remedies are "
                 "tried before the sensitivity search and the most accurate on validation is kept (ties: the "
                 "configured scheme)")


def quantize_step(src: Path, root: Path, cfg, dataset, evaluator, parent_logits: dict, *, seed: int, max_length: int,
                  goal_fields: Callable[[dict], dict], parent_meets_goal: bool, dst_rel: str = "int8/model.onnx",
                  log: Callable[[str], None] | None = None, cpu: dict | None = None):
    """The compress stage's int8 step on ``src`` (an ONNX file inside ``root``) with ``cfg`` (a
    ``QuantizeConfig``): pick the scheme (hardware-aware, see :func:`int8_schemes`), then, when the goal
    is missed and the float parent meets it, keep the most sensitive nodes in fp32 within
    ``cfg.sensitivity_budget``. Writes ``root/dst_rel`` and returns its ``StepResult``."""
    from edgeft.data import stratified_subsample
    from edgeft.evaluate import StepResult, compare, kl_divergence
    from edgeft.export import check_onnx, model_size_mb, onnx_param_count

    log = log or (lambda _msg: None)
    src, root = Path(src), Path(root)
    dst = root / dst_rel
    work = root / ".quantize-work"
    work.mkdir(exist_ok=True)
    cpu = cpu if cpu is not None else cpu_int8_info()
    if cfg.mode == "static":
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(dataset.train))[:cfg.calibration.samples]
        feeds = calibration_feeds(src, evaluator.tokenizer, dataset.train.take(idx).texts, max_length=max_length)
        calibration = {"method": cfg.calibration.method, "samples": len(feeds), "split": "train"}

        def make_qfn(scheme: Int8Scheme):
            def qfn(s, d, exclude=(), only=None):
                return quantize_static(s, d, feeds, method=cfg.calibration.method, per_channel=cfg.per_channel,
                                       reduce_range=scheme.reduce_range, weight_type=scheme.weight_type,
                                       exclude=exclude, only=only)
            return qfn
    else:
        calibration = None

        def make_qfn(scheme: Int8Scheme):
            def qfn(s, d, exclude=(), only=None):
                return quantize_dynamic(s, d, per_channel=cfg.per_channel, reduce_range=scheme.reduce_range,
                                        weight_type=scheme.weight_type, exclude=exclude, only=only)
            return qfn

    attempts: list[dict] = []
    paths: dict[int, Path] = {}

    def attempt(qfn, scheme: Int8Scheme, exclude: list[str], record: bool = True) -> dict:
        path = work / f"try{len(paths)}" / "model.onnx"
        qfn(src, path, exclude=exclude)
        logits = evaluator.onnx_logits(path)
        rec = {"fp32_nodes": list(exclude), **evaluator.metrics(logits), **compare(logits, parent_logits,
                                                                                    float_step=False),
               "size_mb": model_size_mb(path)}
        rec.update(goal_fields(rec))
        paths[id(rec)] = path
        if record:
            attempts.append(rec)
        return rec

    # ---- 1. the scheme: the configured one, and on CPUs without VNNI the documented remedies
    schemes, reason = int8_schemes(cfg.reduce_range, cpu)
    tried = [(s, attempt(make_qfn(s), s, [], record=False)) for s in schemes]
    best_i = max(range(len(tried)), key=lambda i: (tried[i][1]["validation"]["accuracy"], -i))
    scheme, first = tried[best_i]
    attempts.append(first)
    for s, rec in tried:
        if len(tried) > 1:
            log(f"  int8 {s.name}: validation acc {rec['validation']['accuracy']:.4f} "
                f"(drop {rec['accuracy_drop_points']:.2f} points)")
    qfn = make_qfn(scheme)
    log(f"  int8 {cfg.mode} {scheme.name}{' per-channel' if cfg.per_channel else ''}: validation acc "
        f"{first['validation']['accuracy']:.4f} (drop {first['accuracy_drop_points']:.2f} points), "
        f"agreement {first['agreement_vs_parent']['validation']:.4f}")
    scheme_choice = {
        "cpu": cpu, "reason": reason, "chosen": scheme.name,
        "candidates": [{**s.describe(), "validation_accuracy": r["validation"]["accuracy"],
                        "accuracy_drop_points": r["accuracy_drop_points"], "meets_goal": r["meets_goal"],
                        "agreement_vs_parent": r["agreement_vs_parent"]["validation"]} for s, r in tried],
    }

    # ---- 2. sensitivity fallback: keep the most sensitive nodes in fp32
    sensitivity: dict[str, float] = {}
    search_note = None
    if not first["meets_goal"] and cfg.sensitivity_budget > 0:
        if not parent_meets_goal:
            search_note = "skipped: the float model already misses the goal, keeping nodes fp32 cannot fix that"
        else:
            nodes = quantizable_nodes(src)
            sub = stratified_subsample(dataset.validation, SENSITIVITY_SAMPLES, seed + 7)
            parent_sub = evaluator.onnx_texts_logits(src, sub.texts)
            log(f"  int8 misses the goal: measuring the sensitivity of {len(nodes)} nodes")
            def score(path: Path) -> float:
                return kl_divergence(parent_sub, evaluator.onnx_texts_logits(path, sub.texts))

            sensitivity = node_sensitivity(qfn, src, nodes, score, work)
            ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)
            for k in exclusion_steps(min(cfg.sensitivity_budget, len(ranked))):
                rec = attempt(qfn, scheme, ranked[:k])
                log(f"    {k} node(s) fp32: validation acc {rec['validation']['accuracy']:.4f} "
                    f"(drop {rec['accuracy_drop_points']:.2f})")
                if rec["meets_goal"]:
                    break
    # Keep the first attempt that meets the goal (fewest fp32 nodes, fastest); else the most accurate.
    meeting = [a for a in attempts if a["meets_goal"]]
    chosen = meeting[0] if meeting else max(attempts, key=lambda a: (a["validation"]["accuracy"],
                                                                     -len(a["fp32_nodes"])))
    dst.parent.mkdir(parents=True, exist_ok=True)
    paths[id(chosen)].replace(dst)
    copy_side_files(src.parent, dst.parent)
    shutil.rmtree(work, ignore_errors=True)
    checks = check_onnx(dst)
    fields = {"runtime": "onnxruntime-cpu", "path": dst_rel, "mode": cfg.mode, "per_channel": cfg.per_channel,
              "reduce_range": scheme.reduce_range, "input": str(src.relative_to(root)),
              "weights": scheme.weight_type,
              "activations": "u8 (dynamic, per tensor)" if cfg.mode == "dynamic" else "u8 (static QDQ)",
              **({"calibration": calibration} if calibration else {}),
              "scheme": scheme.name, "scheme_choice": scheme_choice, "cpu_int8": cpu,
              "size_mb": model_size_mb(dst), "params": onnx_param_count(dst),
              "quantized_ops": quantized_op_summary(dst), "checks": checks,
              **chosen,
              "attempts": [{k: v for k, v in a.items() if k != "test"} for a in attempts],
              "sensitivity": dict(sorted(sensitivity.items(), key=lambda kv: -kv[1])) if sensitivity else {},
              "sensitivity_metric": f"KL(parent || int8) of logits on {SENSITIVITY_SAMPLES} validation samples, "
                                    "one node quantized at a time" if sensitivity else None}
    if search_note:
        fields["sensitivity_note"] = search_note
    return StepResult("quantize", fields, path=dst)
