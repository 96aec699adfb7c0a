"""ONNX export (optimum's exporter) and graph optimisation (ONNX Runtime's transformer fusions).

Every ONNX folder edgeft writes is self-contained: ``model.onnx`` plus the
config, tokenizer files and ``edgeft.json`` of the model it came from, so later
stages can tokenize without looking elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections import Counter
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.safeio import TOKENIZER_FILES, load_onnx_checked

ONNX_NAME = "model.onnx"
# Files copied beside every model.onnx (tokenizer, config and edgeft's own metadata).
SIDE_FILES = ("config.json", "edgeft.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "merges.txt", *TOKENIZER_FILES)
# Fused operators ONNX Runtime's transformer optimizer can produce (counted in the report).
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization",
             "LayerNormalization", "BiasGelu", "Gelu", "FastGelu", "FusedMatMul", "QAttention",
             "QEmbedLayerNormalization", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
OPT_LEVELS = (0, 1, 2, 99)


def copy_side_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy config/tokenizer/edgeft.json from ``src_dir`` into ``dst_dir``; return the names copied."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in dict.fromkeys(SIDE_FILES):
        p = src_dir / name
        if p.is_file() and not p.is_symlink():
            shutil.copyfile(p, dst_dir / name)
            copied.append(name)
    return copied


def op_counts(model_or_path) -> dict[str, int]:
    """Operator type -> count, for an onnx ModelProto or a path (external data not loaded)."""
    import onnx

    model = model_or_path
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model_or_path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))


def check_onnx(path: str | Path) -> None:
    """External-data containment, ``onnx.checker`` and an ORT session: raises ModelError on failure."""
    load_onnx_checked(path)
    from edgeft.onnx_eval import make_session

    make_session(path, threads=1)


def export_onnx(model_dir: str | Path, out_dir: str | Path, opset: int = 17) -> Path:
    """Export a Hugging Face sequence classifier to ``out_dir/model.onnx`` with dynamic batch and
    sequence axes (optimum's exporter, task text-classification); check it and copy the side files."""
    from optimum.exporters.onnx import main_export

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".export"
    # optimum prints a lot and warns about things that do not apply here; keep the console clean.
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), quiet_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer/deprecation warnings that do not apply to these models
            # The packaged MiniLM folder also holds sentence-transformers files (modules.json): without
            # library_name optimum would export a sentence-embedding model instead of the classifier.
            main_export(str(model_dir), output=str(tmp), task="text-classification", library_name="transformers",
                        opset=opset, do_validation=False, device="cpu")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"ONNX export of {model_dir} failed: {' '.join(str(e).split())[:200]}",
                         "check the model folder; edgeft exports sequence classifiers") from None
    produced = tmp / ONNX_NAME
    if not produced.is_file():
        raise ModelError(f"ONNX export of {model_dir} produced no {ONNX_NAME}", "check the model folder")
    extra = [p.name for p in tmp.iterdir() if p.name not in (ONNX_NAME,) and p.suffix in (".onnx_data", ".data")]
    if extra:
        raise ModelError(f"ONNX export of {model_dir} wrote external data ({extra[0]})",
                         "models over 2 GB are not supported by the compress stage")
    target = out_dir / ONNX_NAME
    shutil.move(str(produced), target)
    shutil.rmtree(tmp, ignore_errors=True)
    copy_side_files(model_dir, out_dir)
    check_onnx(target)
    return target


def optimize_onnx(onnx_path: str | Path, out_dir: str | Path, *, level: int = 1, model_type: str = "bert",
                  src_dir: str | Path | None = None) -> tuple[Path, dict[str, int]]:
    """Apply ONNX Runtime's transformer fusions (attention, skip-layer-norm, GELU, embed-layer-norm).

    ``level`` 0: python fusions only; 1: ORT basic + fusions; 2/99: also ORT's extended/layout
    rewrites (CPU-specific graph). Returns the optimized path and the fused-operator counts.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if level not in OPT_LEVELS:
        raise ModelError(f"compress.optimize.level={level} is not an ONNX Runtime optimizer level",
                         f"use one of {', '.join(map(str, OPT_LEVELS))}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    load_onnx_checked(onnx_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = FusionOptions("bert")
    options.enable_gelu_approximation = False  # exact GELU: float parity with the parent model
    # num_heads/hidden_size 0: detected per layer from the graph (pruned layers have fewer heads, and the
    # fusion then warns that the q/k/v input width differs from heads*head_size, which is expected).
    with quiet_logs():
        optimized = optimize_model(str(onnx_path), model_type=ort_model_type(model_type), num_heads=0,
                                   hidden_size=0, optimization_options=options, opt_level=level, use_gpu=False)
    target = out_dir / ONNX_NAME
    optimized.save_model_to_file(str(target), use_external_data_format=False)
    copy_side_files(src_dir or onnx_path.parent, out_dir)
    check_onnx(target)
    counts = op_counts(target)
    return target, {k: v for k, v in counts.items() if k in FUSED_OPS}


@contextlib.contextmanager
def quiet_logs():
    """Silence python warnings of ORT's tools and its C++ log for the duration of the block."""
    import onnxruntime as ort

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        logging.disable(previous)


def ort_model_type(hf_model_type: str) -> str:
    # ORT's BERT fusions also match RoBERTa / XLM-R / DistilBERT graphs exported by optimum.
    return "bert"
