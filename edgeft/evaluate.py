"""Shared evaluation: batched prediction over texts, split metrics, and model-vs-model comparison.

One batching for every runtime (torch in ``edgeft.train``, ONNX Runtime in ``edgeft.onnx_eval``,
the bench engines in ``edgeft.bench``): texts are tokenized once (truncated to ``max_length``),
sorted by token length so each batch pads little, padded to the longest row of the batch, run,
and the logits are put back in the original order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.metrics import agreement, classification_metrics

EVAL_BATCH_SIZE = 64
SPLITS = ("validation", "test")


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[dict]:
    """One dict of token lists per text (no padding), truncated to ``max_length``."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def pad_batch(features: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """Pad to the longest row of the batch (dynamic padding): int64 arrays, ``pad_id`` for input_ids, 0 else."""
    longest = max(len(f["input_ids"]) for f in features)
    out = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = np.asarray([list(f[key]) + [fill] * (longest - len(f[key])) for f in features], dtype=np.int64)
    return out


def predict_batched(run_batch: Callable[[dict[str, np.ndarray]], np.ndarray], tokenizer, texts: Sequence[str], *,
                    max_length: int, batch_size: int = EVAL_BATCH_SIZE, num_outputs: int | None = None,
                    on_batch: Callable[[], None] | None = None) -> np.ndarray:
    """Logits of ``texts`` in their original order; ``run_batch`` maps a padded batch (numpy int64 arrays)
    to its logits. ``num_outputs`` fixes the width of an empty result; ``on_batch`` is called after each batch."""
    feats = tokenize(tokenizer, texts, max_length)
    order = np.argsort([len(f["input_ids"]) for f in feats], kind="stable")
    pad_id = tokenizer.pad_token_id or 0
    out = np.zeros((len(texts), num_outputs), dtype=np.float32) if num_outputs is not None else None
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        logits = np.asarray(run_batch(pad_batch([feats[i] for i in idx], pad_id)), dtype=np.float32)
        if out is None:
            out = np.zeros((len(texts), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
        if on_batch is not None:
            on_batch()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def split_metrics(labels, logits: np.ndarray, label_names: list[str]) -> dict:
    """Accuracy, macro-F1 and n of ``logits`` against ``labels``."""
    m = classification_metrics(labels, logits.argmax(-1) if len(logits) else np.zeros(0, np.int64), label_names)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}


def agreement_and_diff(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Prediction agreement and max absolute logit difference of ``logits`` vs ``reference``."""
    agree = agreement(logits.argmax(-1), reference.argmax(-1)) if len(logits) else 1.0
    diff = float(np.abs(logits - reference).max()) if len(logits) else 0.0
    return agree, diff


def compare(logits: dict[str, np.ndarray], parent: dict[str, np.ndarray], *, float_step: bool) -> dict:
    """Per-split agreement and the max abs logit difference (over the splits) of a model vs its parent."""
    pairs = {s: agreement_and_diff(logits[s], parent[s]) for s in logits}
    out = {"agreement_vs_parent": {s: a for s, (a, _) in pairs.items()},
           "max_abs_logit_diff_vs_parent": max((d for _, d in pairs.values()), default=0.0)}
    if not float_step:
        out["max_abs_logit_diff_vs_parent_note"] = "int8: compared by agreement and accuracy, not atol"
    return out


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(softmax(p) || softmax(q)) over rows, in float64."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@dataclass
class SplitEvaluator:
    """Logits of a dataset's validation and test splits for torch models and ONNX files, and their metrics."""

    dataset: object
    tokenizer: object
    max_length: int
    batch_size: int = EVAL_BATCH_SIZE
    threads: int | None = None  # ONNX Runtime intra-op threads (None: the usable cores)

    def torch_logits(self, model, splits: Sequence[str] = SPLITS) -> dict[str, np.ndarray]:
        from edgeft.train import predict_logits

        return {s: predict_logits(model, self.tokenizer, self.dataset.split(s).texts, max_length=self.max_length,
                                  batch_size=self.batch_size) for s in splits}

    def onnx_logits(self, path: Path, splits: Sequence[str] = SPLITS) -> dict[str, np.ndarray]:
        from edgeft.onnx_eval import make_session, onnx_logits

        session = make_session(path, threads=self.threads)
        return {s: onnx_logits(session, self.tokenizer, self.dataset.split(s).texts, max_length=self.max_length,
                               batch_size=self.batch_size) for s in splits}

    def onnx_texts_logits(self, path: Path, texts: Sequence[str]) -> np.ndarray:
        from edgeft.onnx_eval import make_session, onnx_logits

        return onnx_logits(make_session(path, threads=self.threads), self.tokenizer, list(texts),
                           max_length=self.max_length,
                           batch_size=self.batch_size)

    def metrics(self, logits: dict[str, np.ndarray]) -> dict:
        return {s: split_metrics(self.dataset.split(s).labels, lg, self.dataset.label_names)
                for s, lg in logits.items()}


@dataclass
class StepResult:
    """One validated compress step: the fields report.json records for it, the model it produced
    (``path``, absolute; the report holds it relative to the compress folder) and its logits on the
    validation and test splits (the next step's parent). Only ``to_report()`` goes into report.json."""

    step: str
    fields: dict
    path: Path | None = None
    logits: dict[str, np.ndarray] | None = None

    def __getitem__(self, key: str):
        return self.fields[key]

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def update(self, more: dict) -> None:
        self.fields.update(more)

    @property
    def meets_goal(self) -> bool:
        return bool(self.fields.get("meets_goal", False))

    @property
    def validation_accuracy(self) -> float:
        return float(self.fields["validation"]["accuracy"])

    def to_report(self) -> dict:
        return {"step": self.step, **self.fields}
