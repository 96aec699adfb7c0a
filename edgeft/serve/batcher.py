"""Dynamic batching: one bounded queue, ONE inference worker thread.

Requests wait in a bounded ``queue.Queue``; the worker takes what is queued, waiting at most
``max_queue_delay_ms`` for batch-mates, but only while admitted requests are still on their way to
the queue (receiving their body, being parsed): when every admitted request is in hand, waiting
could only add latency (at one client it added the whole delay to every answer). It caps the batch at ``max_batch_size`` rows and
``max_batch_tokens`` padded tokens (rows x longest text), pads to the longest text in the
batch, and runs it. Only this thread calls ``session.run``: concurrent runs oversubscribe
the CPU's threads and collapse throughput. Requests whose client left (their future was
cancelled) or whose deadline passed are dropped before compute.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from typing import Callable

from edgeft.serve.engine import DeadlineExceeded, EngineUnavailable, Prediction, QueueFull
from edgeft.serve.runner import Encoded, ModelRunner

log = logging.getLogger("edgeft.serve")

WARMUP_TEXTS = ["warm up", "a somewhat longer warm up sentence to exercise more positions in the model " * 3]


class _Job:
    __slots__ = ("texts", "encs", "logits", "left", "fut", "loop", "deadline", "t_in", "queue_s", "tokenize_s",
                 "compute_s", "batch_size", "cancelled")

    def __init__(self, texts, fut, loop, deadline):
        self.texts, self.fut, self.loop, self.deadline = texts, fut, loop, deadline
        self.encs: list[Encoded] | None = None
        self.logits: list = [None] * len(texts)
        self.left = len(texts)
        self.t_in = time.monotonic()
        self.queue_s = None
        self.tokenize_s = self.compute_s = 0.0
        self.batch_size = 0
        self.cancelled = False

    def dead(self) -> bool:
        return self.cancelled or self.fut.done()

    def _set(self, result=None, exc=None):
        if not self.fut.done():
            if exc is not None:
                self.fut.set_exception(exc)
            else:
                self.fut.set_result(result)

    def finish(self, result=None, exc=None):
        try:
            self.loop.call_soon_threadsafe(self._set, result, exc)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


class BatchingEngine:
    def __init__(self, runner: ModelRunner, labels: list[str], *, max_batch_size: int = 32,
                 max_batch_tokens: int = 16384, max_queue_delay_ms: float = 2.0, queue_capacity: int = 256,
                 warmup_batches: int = 3, on_batch: Callable[[int, list[int]], None] | None = None):
        self.runner, self.labels = runner, list(labels)
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.delay_s = max_queue_delay_ms / 1000
        self.warmup_batches = warmup_batches
        self.on_batch = on_batch
        self._q: queue.Queue[_Job] = queue.Queue(maxsize=queue_capacity)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        # Requests admitted by the HTTP layer and not answered yet (set by the server); with
        # ``_outstanding`` (requests inside predict()) it tells whether batch-mates are on their way.
        self.admitted: Callable[[], int] | None = None
        self._outstanding = 0

    # -- the engine interface -------------------------------------------------------------
    def is_ready(self) -> bool:
        return self._ready.is_set() and not self._stop.is_set()

    async def predict(self, texts: list[str], deadline: float) -> list[Prediction]:
        if self._stop.is_set():
            raise EngineUnavailable("the server is shutting down")
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), loop.create_future(), loop, deadline)
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self._q.maxsize} requests)") from None
        self._outstanding += 1
        try:
            return await job.fut
        except asyncio.CancelledError:
            job.cancelled = True  # the worker drops it if it has not started it
            raise
        finally:
            self._outstanding -= 1

    def _mates_on_the_way(self) -> bool:
        """Admitted requests that have not reached predict() yet (no counter: assume some may come)."""
        return self.admitted is None or self.admitted() > self._outstanding

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="edgeft-infer", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work; the worker finishes what is queued, then exits."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._q.qsize()

    # -- the worker ---------------------------------------------------------------------
    def _warmup(self) -> None:
        for i in range(self.warmup_batches):
            self.runner.predict(WARMUP_TEXTS * (1 + i))
        self._ready.set()
        log.info("model warmed up (%d batches): ready", self.warmup_batches)

    def _work(self) -> None:
        try:
            self._warmup()
        except Exception:
            log.exception("warm-up failed: the server stays not ready")
            return
        rows: deque[tuple[_Job, int]] = deque()
        while True:
            if not rows:
                try:
                    self._take(rows, self._q.get(timeout=0.05))
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
            t_end = time.monotonic() + self.delay_s
            while len(rows) < self.max_batch_size:
                try:
                    job = self._q.get_nowait()  # what is queued now
                except queue.Empty:
                    remaining = t_end - time.monotonic()
                    if remaining <= 0 or not self._mates_on_the_way():
                        break
                    try:  # short polls: the on-the-way count is re-read as requests arrive or leave
                        job = self._q.get(timeout=min(remaining, 0.0005))
                    except queue.Empty:
                        continue
                self._take(rows, job)
            try:
                self._run_one(rows)
            except Exception as e:  # never let the only worker die: fail what it held, keep serving
                log.exception("batch failed")
                for job in {id(j): j for j, _ in rows}.values():
                    job.cancelled = True
                    job.finish(exc=RuntimeError(f"inference failed ({type(e).__name__})"))
                rows.clear()

    def _take(self, rows: deque, job: _Job) -> None:
        rows.extend((job, i) for i in range(len(job.texts)))

    def _run_one(self, rows: deque) -> None:
        now = time.monotonic()
        live: deque = deque()
        for job, i in rows:
            if job.dead():
                continue
            if now > job.deadline:
                job.cancelled = True
                job.finish(exc=DeadlineExceeded("the request deadline passed while queued"))
                continue
            live.append((job, i))
        rows.clear()
        rows.extend(live)
        if not rows:
            return
        # Tokenize each newly seen request once (whole request at a time).
        for job, _ in rows:
            if job.encs is None:
                t0 = time.perf_counter()
                job.encs = self.runner.encode(job.texts)
                job.tokenize_s = time.perf_counter() - t0
        batch: list[tuple[_Job, int]] = []
        width = 0
        while rows and len(batch) < self.max_batch_size:
            job, i = rows[0]
            w = max(width, job.encs[i].tokens)
            if batch and w * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(rows.popleft())
            width = w
        t_start = time.monotonic()
        for job, _ in batch:
            if job.queue_s is None:
                job.queue_s = t_start - job.t_in
                job.batch_size = len(batch)
        try:
            t0 = time.perf_counter()
            logits = self.runner.run_encoded([job.encs[i] for job, i in batch])
            compute_s = time.perf_counter() - t0
        except Exception as e:
            log.exception("inference failed")
            for job in {id(j): j for j, _ in batch}.values():
                job.cancelled = True
                job.finish(exc=RuntimeError(f"inference failed ({type(e).__name__})"))
            return
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(batch), [job.encs[i].tokens for job, i in batch])
        seen = set()
        for row, (job, i) in enumerate(batch):
            job.logits[i] = logits[row]
            job.left -= 1
            if id(job) not in seen:
                job.compute_s += compute_s
                seen.add(id(job))
        for job in {id(j): j for j, _ in batch}.values():
            if job.left == 0:
                job.finish([Prediction(job.logits[i], job.encs[i].tokens, job.queue_s, job.tokenize_s, job.compute_s,
                                       job.batch_size) for i in range(len(job.texts))])
