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

from edgeft.errors import ModelError, from_os_error
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
LAYERNORM_MODES = ("instance-norm", "fused")


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


def check_onnx(path: str | Path, *, full_check: bool = False) -> dict:
    """External-data containment, ``onnx.checker.check_model`` and an ORT session: raises ModelError on
    failure. Returns what was run (for the report): checker call and options, onnx version, ORT load."""
    import onnx
    import onnxruntime as ort

    load_onnx_checked(path, full_check=full_check)
    from edgeft.onnx_eval import make_session

    session = make_session(path, threads=1)
    return {"external_data": "contained", "check_model": "full_check" if full_check else "basic",
            "onnx_version": onnx.__version__, "ort_session": f"onnxruntime {ort.__version__} "
            f"{'+'.join(session.get_providers())}", "ok": True}


def model_size_mb(path: str | Path) -> float:
    """Size in MB (10^6 bytes, like every ``_mb`` edgeft writes): a file, or a folder's ``*.safetensors``."""
    from edgeft.hardware import MB

    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors")) / MB
    return path.stat().st_size / MB


def onnx_param_count(path: str | Path) -> int:
    """Number of values in the graph's initializers (external data not loaded)."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def export_onnx(model_dir: str | Path, out_dir: str | Path, opset: int = 17, *, checks: dict | None = None) -> Path:
    """Export a Hugging Face sequence classifier to ``out_dir/model.onnx`` with dynamic batch and
    sequence axes (optimum's exporter, task text-classification); check it and copy the side files.
    ``checks``, when given, receives what :func:`check_onnx` ran on the result."""
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
        env = from_os_error(e, tmp)  # a full disk or a permission problem is not the model folder's fault
        if env is not None:
            raise env from None
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
    record = check_onnx(target)
    if checks is not None:
        checks.update(record)
    return target


def optimize_onnx(onnx_path: str | Path, out_dir: str | Path, *, level: int = 1, model_type: str = "bert",
                  src_dir: str | Path | None = None, layernorm: str = "instance-norm") -> tuple[Path, dict[str, int]]:
    """Apply ONNX Runtime's transformer fusions (attention, skip-layer-norm, GELU, embed-layer-norm).

    ``level`` 0: python fusions only; 1: ORT basic + fusions; 2/99: also ORT's extended/layout
    rewrites (CPU-specific graph). ``layernorm="instance-norm"`` then rewrites the (Skip)LayerNorms
    with :func:`layernorm_as_instance_norm`. Returns the optimized path and the fused-operator counts
    (``LayerNormAsInstanceNorm``: how many were rewritten).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if level not in OPT_LEVELS:
        raise ModelError(f"compress.optimize.level={level} is not an ONNX Runtime optimizer level",
                         f"use one of {', '.join(map(str, OPT_LEVELS))}")
    if layernorm not in LAYERNORM_MODES:
        raise ModelError(f"compress.optimize.layernorm={layernorm!r} is not a layer-norm mode",
                         f"use one of {', '.join(LAYERNORM_MODES)}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    load_onnx_checked(onnx_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    ort_type = ort_model_type(model_type)
    options = FusionOptions(ort_type)
    options.enable_gelu_approximation = False  # exact GELU: float parity with the parent model
    # num_heads/hidden_size 0: detected per layer from the graph (pruned layers have fewer heads, and the
    # fusion then warns that the q/k/v input width differs from heads*head_size, which is expected).
    with quiet_logs():
        optimized = optimize_model(str(onnx_path), model_type=ort_type, num_heads=0,
                                   hidden_size=0, optimization_options=options, opt_level=level, use_gpu=False)
    rewritten = layernorm_as_instance_norm(optimized.model) if layernorm == "instance-norm" else 0
    target = out_dir / ONNX_NAME
    optimized.save_model_to_file(str(target), use_external_data_format=False)
    copy_side_files(src_dir or onnx_path.parent, out_dir)
    check_onnx(target)
    counts = {k: v for k, v in op_counts(target).items() if k in FUSED_OPS}
    if rewritten:
        counts["LayerNormAsInstanceNorm"] = rewritten
    return target, counts


def layernorm_as_instance_norm(model) -> int:
    """Rewrite every last-axis ``LayerNormalization`` / ``SkipLayerNormalization`` of an ONNX
    ModelProto, in place, as ``[Add skip, Add bias] -> Reshape [-1, 1, H] -> InstanceNormalization
    -> Reshape back -> Mul gamma -> Add beta``. Same function (within float rounding); returns the
    number of nodes rewritten.

    Why: ONNX Runtime's CPU SkipLayerNormalization kernel is slow: one [1, 128, 384] call on 2 threads
    takes 110 us on a 2-core AMD EPYC (2.2 ns per element; torch's add + layer_norm: 19 us), rewritten
    41 us (``bench/layernorm_kernel.py``, ``bench/results/20261201-2019-layernorm-kernel.md``); on an
    Intel Xeon it was ~29% of int8 MiniLM's time. (A plain LayerNormalization is fast, 16 us, and
    its rewrite slower, 29 us; fused BERT graphs have none.) On GPU keep the fused op (``layernorm: fused``).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    consumers = Counter(x for n in graph.node for x in n.input)
    consumers.update(o.name for o in graph.output)
    nodes, rewritten, by_width = [], 0, {}
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "SkipLayerNormalization" and n.domain == "com.microsoft":
            x, skip, gamma = n.input[0], n.input[1], n.input[2]
            beta = n.input[3] if len(n.input) > 3 and n.input[3] else None
            bias = n.input[4] if len(n.input) > 4 and n.input[4] else None
            extra_out = [o for o in n.output[1:3] if o and consumers[o]]  # mean / inv-std: not rewritten
            sum_out = n.output[3] if len(n.output) > 3 and n.output[3] else None
        elif n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx") and attrs.get("axis", -1) == -1:
            x, skip, gamma = n.input[0], None, n.input[1]
            beta = n.input[2] if len(n.input) > 2 and n.input[2] else None
            bias, sum_out = None, None
            extra_out = [o for o in n.output[1:] if o and consumers[o]]
        else:
            nodes.append(n)
            continue
        if extra_out or len(shapes.get(gamma, ())) != 1:
            nodes.append(n)  # statistics consumed downstream, or gamma not a constant vector: keep it
            continue
        width = shapes[gamma][0]
        if width not in by_width:
            by_width[width] = f"edgeft_ln_rows_{width}"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, 1, width], np.int64), by_width[width]))
        if rewritten == 0:
            graph.initializer.extend([numpy_helper.from_array(np.ones(1, np.float32), "edgeft_ln_one"),
                                      numpy_helper.from_array(np.zeros(1, np.float32), "edgeft_ln_zero")])
        p = n.name or f"ln_{rewritten}"
        total = x
        # The matmul bias first: ORT folds "MatMul(Integer) + Add bias" into one kernel at load time.
        for other, tag in ((bias, "bias"), (skip, "skip")):
            if other:
                nodes.append(helper.make_node("Add", [total, other], [f"{p}/{tag}_sum"], name=f"{p}/add_{tag}"))
                total = f"{p}/{tag}_sum"
        if sum_out:
            nodes.append(helper.make_node("Identity", [total], [sum_out], name=f"{p}/sum_out"))
        y = n.output[0]
        nodes += [
            helper.make_node("Reshape", [total, by_width[width]], [f"{p}/rows"], name=f"{p}/rows"),
            helper.make_node("InstanceNormalization", [f"{p}/rows", "edgeft_ln_one", "edgeft_ln_zero"],
                             [f"{p}/normed_rows"], name=f"{p}/norm", epsilon=float(attrs.get("epsilon", 1e-5))),
            helper.make_node("Shape", [total], [f"{p}/shape"], name=f"{p}/shape"),
            helper.make_node("Reshape", [f"{p}/normed_rows", f"{p}/shape"], [f"{p}/normed"], name=f"{p}/unrows"),
            helper.make_node("Mul", [f"{p}/normed", gamma], [f"{p}/scaled"] if beta else [y], name=f"{p}/gamma"),
        ]
        if beta:
            nodes.append(helper.make_node("Add", [f"{p}/scaled", beta], [y], name=f"{p}/beta"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


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


# Hugging Face model types whose optimum-exported graphs ORT's "bert" fusions match.
BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra", "mpnet")


def ort_model_type(hf_model_type: str) -> str:
    """The ORT transformers-optimizer model type for a Hugging Face ``model_type``: the BERT family maps
    to "bert" (ORT's BERT fusions match RoBERTa / XLM-R / DistilBERT graphs exported by optimum); a
    type ORT's optimizer knows itself (gpt2, bart, t5, vit, ...) is passed through; anything else
    gets the BERT fusions, which only rewrite the subgraphs they match."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    name = str(hf_model_type).replace("-", "_")
    if hf_model_type in BERT_FAMILY:
        return "bert"
    return name if name in MODEL_TYPES else "bert"
