"""The interface between the HTTP layer and whatever runs the model.

The routes, codec, auth and metrics (app.py) never touch ONNX Runtime or a queue: they call
an *engine*, any object with::

    labels: list[str]                       # class names, index order
    def is_ready(self) -> bool              # warmed up and accepting work
    async def predict(self, texts: list[str], deadline: float) -> list[Prediction]

``deadline`` is an absolute ``time.monotonic()`` value; an engine raises
:class:`QueueFull` when it cannot take the request now and :class:`DeadlineExceeded`
when the deadline passed before the texts were computed (both answer 503 with
Retry-After). It returns one :class:`Prediction` per text, in order. A cancelled
``predict`` (the client left) must not be computed if it has not started yet.

:class:`edgeft.serve.batcher.BatchingEngine` is the built-in engine (one bounded queue,
one inference worker thread, dynamic batching); edgeft.scale.ray_app's replicas serve the same
``build_app`` with an engine whose ``predict`` calls their ``@serve.batch`` method.
Engines may report each computed batch to ``Metrics.observe_batch(rows, tokens_per_row)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Prediction:
    logits: np.ndarray          # float32 [num_labels]
    tokens: int                 # input tokens of this text (after truncation to max_length)
    queue_s: float = 0.0        # admission -> its first batch started
    tokenize_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 1         # rows in the (first) batch it ran in


class EngineUnavailable(Exception):
    """The engine cannot answer now (503 + Retry-After)."""

    reason = "unavailable"


class QueueFull(EngineUnavailable):
    reason = "queue_full"


class DeadlineExceeded(EngineUnavailable):
    reason = "timeout"


class Engine(Protocol):
    labels: list[str]

    def is_ready(self) -> bool: ...

    async def predict(self, texts: list[str], deadline: float) -> list[Prediction]: ...
