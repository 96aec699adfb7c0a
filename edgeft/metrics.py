"""Classification metrics (plain numpy: no extra dependency for a confusion matrix)."""

from __future__ import annotations

import numpy as np


def classification_metrics(labels, preds, label_names: list[str]) -> dict:
    y, p = np.asarray(labels), np.asarray(preds)
    k = len(label_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return {
        "n": int(len(y)),
        "accuracy": float((y == p).mean()) if len(y) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
    }


def agreement(preds_a, preds_b) -> float:
    a, b = np.asarray(preds_a), np.asarray(preds_b)
    return float((a == b).mean()) if len(a) else 1.0
