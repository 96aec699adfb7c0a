"""ONNX Runtime sessions and logits for a list of texts (batched by ``edgeft.evaluate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.errors import ModelError
from edgeft.hardware import usable_cores
from edgeft.safeio import check_onnx_external_data


def make_session(path: str | Path, *, threads: int | None = None, optimize: bool = True,
                 providers: list[str] | tuple[str, ...] = ("CPUExecutionProvider",), spinning: bool = True):
    """A session for ``path`` after the external-data check; ``threads`` intra-op threads, 1 inter-op.

    ``spinning=False`` stops ORT's worker threads from busy-waiting between calls: faster for a lone
    benchmark loop, but a server whose HTTP thread shares the cores wants the cores back."""
    import onnxruntime as ort

    path = Path(path)
    check_onnx_external_data(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or usable_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    try:
        sess = ort.InferenceSession(str(path), so, providers=list(providers))
    except Exception as e:  # ORT raises its own exception types for bad graphs
        raise ModelError(f"ONNX Runtime cannot load {path} ({' '.join(str(e).split())[:200]})",
                         "re-export the model") from None
    return sess


def feeds_for(session, batch: dict) -> dict[str, np.ndarray]:
    """Map a collated batch (torch tensors or arrays) onto the session's inputs; token_type_ids
    default to zeros when the graph wants them and the tokenizer did not give them."""
    names = [i.name for i in session.get_inputs()]
    out = {}
    for name in names:
        if name in batch:
            v = batch[name]
            out[name] = np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.int64)
        elif name == "token_type_ids":
            out[name] = np.zeros_like(np.asarray(batch["input_ids"]), dtype=np.int64)
        else:
            raise ModelError(f"the ONNX model wants an input '{name}' the tokenizer does not produce",
                             "export the model with edgeft")
    return out


def onnx_logits(session, tokenizer, texts: list[str], *, max_length: int, batch_size: int = 64) -> np.ndarray:
    """Logits of ``texts`` (original order) from an ORT session."""
    from edgeft.evaluate import predict_batched

    return predict_batched(lambda batch: session.run(None, feeds_for(session, batch))[0], tokenizer, texts,
                           max_length=max_length, batch_size=batch_size)
