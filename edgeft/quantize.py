"""int8 quantization with ONNX Runtime: dynamic (weights per channel by default) and static QDQ
with calibration; per-node sensitivity to pick the MatMuls to keep in fp32; and the plain
optimum path used as a benchmark baseline.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
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


def _name_nodes(onnx_path: Path) -> None:
    """Give every node a unique name (needed to exclude nodes from quantization)."""
    import onnx

    model = onnx.load(str(onnx_path))
    seen, changed = set(), False
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
            changed = True
        seen.add(n.name)
    if changed:
        onnx.save(model, str(onnx_path))


def quantize_dynamic(src: str | Path, dst: str | Path, *, per_channel: bool = True, reduce_range: bool = False,
                     exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> Path:
    """Dynamic int8: weights quantized offline (s8, per output channel by default), activations
    quantized on the fly. Quantizes MatMul, fused Attention, Gather/EmbedLayerNormalization tables."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    _quiet()
    src, dst = Path(src), Path(dst)
    load_onnx_checked(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with quiet_logs():
        ort_quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude) or None,
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
                    exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> Path:
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
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
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


def onnx_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6


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
