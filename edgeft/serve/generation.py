"""Text generation for ``edgeft serve`` on a text-generation bundle: one ONNX Runtime decoder, a bounded
queue and ``generation_slots`` worker threads.

The HTTP layer (edgeft.serve.completions) admits a request (``queue_capacity``), prepares its prompt
and calls :meth:`GenerationEngine.submit`, which queues a :class:`GenerationJob` and never blocks.
A worker thread takes the job, steps :meth:`edgeft.decoder.generate.OrtDecoder.stream` (ONNX Runtime
releases the GIL, so the event loop keeps serving) and turns the tokens into text deltas
(:class:`edgeft.decoder.text.TextStream`: clean UTF-8, stop strings), which it hands to the event loop
as events on the job's asyncio queue::

    ("start", queue_s)     the worker took the job after queue_s in the queue (the HTTP layer answers after this)
    ("text", delta)        new text
    ("done", Finished)     the end: finish reason and token counts
    ("error", exception)   before start: queue deadline passed; after: the model failed

A job whose ``cancel`` event is set (its client left) is dropped if it has not started, and stops
before its next model step if it has: the slot is free again at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from edgeft.decoder.generate import GREEDY, Sampling
from edgeft.serve.engine import DeadlineExceeded, EngineUnavailable, QueueFull

log = logging.getLogger("edgeft.serve")

WARMUP_PROMPT_TOKENS = 8  # warm-up generation: a short prompt of the first token ids, a few new tokens
WARMUP_NEW_TOKENS = 4


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = GREEDY
    stop: tuple[str, ...] = ()


@dataclass
class Finished:
    finish_reason: str       # stop | length | cancelled | error
    completion_tokens: int   # tokens generated (an ending eos included)
    generate_s: float        # the worker's time on the job (prompt + every step)
    ttft_s: float | None     # admission -> first token


@dataclass
class GenerationJob:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    deadline: float                      # time.monotonic() by which the job must have started
    t_admitted: float                    # time.monotonic() of admission (for time to first token)
    t_submitted: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: Finished | None = None

    def post(self, kind: str, payload=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


class GenerationEngine:
    """``submit`` from the event loop, ``generation_slots`` worker threads, ``stop`` to drain."""

    def __init__(self, decoder, tokenizer, *, slots: int = 1, queue_capacity: int = 256, warmup: int = 1,
                 metrics=None):
        self.decoder, self.tokenizer, self.metrics = decoder, tokenizer, metrics
        self.slots, self.warmup = slots, warmup
        self.eos = frozenset(tokenizer.eos_token_ids)
        self._q: queue.Queue[GenerationJob] = queue.Queue(maxsize=queue_capacity)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.active = 0  # jobs being generated now

    # -- the interface the routes use -----------------------------------------------------------
    def is_ready(self) -> bool:
        return self._ready.is_set() and not self._stop.is_set()

    def submit(self, request: GenerationRequest, *, deadline: float, t_admitted: float) -> GenerationJob:
        if self._stop.is_set():
            raise EngineUnavailable("the server is shutting down")
        job = GenerationJob(request, asyncio.get_running_loop(), deadline, t_admitted)
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the generation queue is full ({self._q.maxsize} requests)") from None
        return job

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"edgeft-generate-{i}", daemon=True)
                         for i in range(self.slots)]
        for t in self._threads:
            t.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Take no more work; the workers finish the job in hand (and skip cancelled ones), then exit."""
        self._stop.set()
        t_end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, t_end - time.monotonic()))

    # -- the workers -----------------------------------------------------------------------------
    def _warm_up(self) -> None:
        vocab = max(2, self.tokenizer.vocab_size)
        n = max(1, min(WARMUP_PROMPT_TOKENS, self.decoder.context - 1))
        prompt = [i % vocab for i in range(1, n + 1)]
        new = max(1, min(WARMUP_NEW_TOKENS, self.decoder.context - n))
        for _ in range(self.warmup):
            for _tok in self.decoder.stream(prompt, new):
                pass
        log.info("decoder warmed up (%d generations): ready", self.warmup)

    def _work(self, index: int) -> None:
        if index == 0:
            try:
                self._warm_up()
            except Exception:
                log.exception("warm-up failed: the server stays not ready")
                self._stop.set()
                return
            self._ready.set()
        else:
            while not self._ready.wait(0.05):  # the first worker warms the shared session up
                if self._stop.is_set():
                    return
        while True:
            try:
                job = self._q.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if job.cancel.is_set():  # its client left (or its deadline passed) while it waited: never started
                self._end(job, Finished("cancelled", 0, 0.0, None), count=False)
                continue
            if time.monotonic() > job.deadline:
                job.post("error", DeadlineExceeded("the request deadline passed while it waited for a generation slot"))
                continue
            with self._lock:
                self.active += 1
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.active -= 1

    def _end(self, job: GenerationJob, fin: Finished, *, count: bool = True) -> None:
        job.finished = fin
        if self.metrics is not None and count:
            self.metrics.generations.labels(fin.finish_reason).inc()
        job.post("done", fin)

    def _run(self, job: GenerationJob) -> None:
        req, m = job.request, self.metrics
        t0 = time.monotonic()
        job.post("start", t0 - job.t_submitted)  # the wait for a slot
        if m is not None:
            m.prompt_tokens.inc(len(req.prompt_ids))
        text = self.tokenizer.text_stream(req.stop)
        reason, n, ttft = "length", 0, None
        steps = None
        try:
            steps = self.decoder.stream(req.prompt_ids, req.max_tokens, sampling=req.sampling, stop_token_ids=self.eos)
            for token in steps:
                n += 1
                if n == 1:
                    ttft = time.monotonic() - job.t_admitted
                    if m is not None:
                        m.time_to_first_token.observe(ttft)
                if m is not None:
                    m.generated_tokens.inc()
                if job.cancel.is_set():  # the client left: not one more step
                    reason = "cancelled"
                    break
                if token in self.eos:
                    reason = "stop"
                    break
                delta, stopped = text.push(token)
                if delta:
                    job.post("text", delta)
                if stopped:
                    reason = "stop"
                    break
            if reason != "cancelled":
                tail = text.flush()
                if tail:
                    job.post("text", tail)
        except Exception as e:  # one failed generation must not take the worker down
            log.error("generation failed: %s: %s", type(e).__name__, str(e)[:200])
            reason = "error"
            job.post("error", RuntimeError(f"generation failed ({type(e).__name__})"))
        finally:
            if steps is not None:
                steps.close()
        self._end(job, Finished(reason, n, time.monotonic() - t0, ttft))
