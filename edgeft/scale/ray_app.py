"""The Ray Serve application: the embedded server's routes in every replica, Ray's batching in between.

Each replica opens the bundle (checksums first), loads the same :class:`ModelRunner` as ``edgeft serve``
and serves the same Starlette app (``build_app``: V2 routes, TEI routes, auth, limits, metrics), so a
client cannot tell the engines apart. The app's engine sends every request to the replica's
``@serve.batch`` method: Ray collects requests (up to ``max_batch_size`` calls, waiting at most
``max_queue_delay_ms``), one worker thread computes them in batches capped at ``max_batch_size``
texts and ``max_batch_tokens`` padded tokens. Replicas, autoscaling and back-pressure
(``max_ongoing_requests``; ``max_queued_requests`` -> 503) are Ray's.

This module imports Ray: ``edgeft.scale.ray_serve`` is the part that works without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from edgeft.serve.engine import Prediction

log = logging.getLogger("edgeft.serve")

DEPLOYMENT = "edgeft"  # the deployment's name inside the application (the application is the model's name)


class _ReplicaEngine:
    """The engine interface of edgeft/serve/engine.py over the replica's batch method."""

    def __init__(self, replica: "EdgeftReplica"):
        self.replica = replica
        self.labels = replica.labels

    def is_ready(self) -> bool:
        return True  # Ray routes to a replica only after its constructor (load + warm-up) returned

    async def predict(self, texts: list[str], deadline: float) -> list[Prediction]:
        out = await self.replica.batched((list(texts), time.monotonic(), deadline))
        if isinstance(out, BaseException):  # serve.batch hands each caller its list element as a result
            raise out
        return out


def _chunks(lengths: list[int], max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) row ranges of at most ``max_rows`` rows and ``max_tokens`` padded tokens."""
    out, start, width = [], 0, 0
    for i, n in enumerate(lengths):
        w = max(width, n)
        if i > start and (i - start >= max_rows or w * (i - start + 1) > max_tokens):
            out.append((start, i))
            start, w = i, n
        width = w
    if lengths:
        out.append((start, len(lengths)))
    return out


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class EdgeftReplica:
    def __init__(self, bundle: str, config: dict[str, Any]):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from edgeft.bundle import open_bundle
        from edgeft.serve.app import ModelInfo
        from edgeft.serve.auth import KeyStore
        from edgeft.serve.batcher import WARMUP_TEXTS
        from edgeft.serve.config import ServeConfig
        from edgeft.serve.metrics import Metrics
        from edgeft.serve.runner import ModelRunner

        self.cfg = ServeConfig.model_validate(config)
        b = open_bundle(bundle)  # checksums first, in every replica: a node may hold a different copy
        max_length = self.cfg.max_length or b.max_length
        threads = self.cfg.threads or max(1, round(self.cfg.ray.replica_cpus))
        self.runner = ModelRunner(b.model_dir, b.onnx_path, max_length=max_length, threads=threads,
                                  spinning=self.cfg.ort_spinning)
        self.labels = list(b.labels)
        self.info = ModelInfo(b.name, b.version, self.labels, b.digest, max_length)
        self.metrics = Metrics(latency_budget_s=self.cfg.latency_budget_ms / 1000,
                               queue_capacity=self.cfg.ray.max_ongoing_requests)
        self.keys = KeyStore(self.cfg.keys) if self.cfg.keys is not None else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="edgeft-infer")  # one session.run at a time
        # Ray batches requests (each may hold many texts), and never more than a replica takes at once
        self.batched.set_max_batch_size(min(self.cfg.max_batch_size, self.cfg.ray.max_ongoing_requests))
        self.batched.set_batch_wait_timeout_s(self.cfg.max_queue_delay_ms / 1000)
        for i in range(self.cfg.warmup_batches):
            self.runner.predict(WARMUP_TEXTS * (1 + i))

    def __serve_build_asgi_app__(self):
        from edgeft.serve.app import build_app

        cfg = self.cfg.model_copy(update={"queue_capacity": max(self.cfg.queue_capacity, self.cfg.ray.max_ongoing_requests)})
        return build_app(self.info, cfg, _ReplicaEngine(self), self.metrics, self.keys)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def batched(self, requests: list[tuple[list[str], float, float]]) -> list[list[Prediction]]:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._compute, requests)

    def _compute(self, requests: list[tuple[list[str], float, float]]) -> list[Any]:
        from edgeft.serve.engine import DeadlineExceeded

        t_start = time.monotonic()
        live = [i for i, (_, _, deadline) in enumerate(requests) if deadline > t_start]
        t0 = time.perf_counter()
        encs = [self.runner.encode(requests[i][0]) for i in live]
        tokenize_s = time.perf_counter() - t0
        rows = [(k, j) for k, e in enumerate(encs) for j in range(len(e))]
        logits: list[Any] = [None] * len(rows)
        compute_s = [0.0] * len(encs)
        for a, b in _chunks([encs[k][j].tokens for k, j in rows], self.cfg.max_batch_size, self.cfg.max_batch_tokens):
            t1 = time.perf_counter()
            out = self.runner.run_encoded([encs[k][j] for k, j in rows[a:b]])
            dt = time.perf_counter() - t1
            self.metrics.observe_batch(b - a, [encs[k][j].tokens for k, j in rows[a:b]])
            for r in range(a, b):
                logits[r] = out[r - a]
            for k in {rows[r][0] for r in range(a, b)}:
                compute_s[k] += dt
        results: list[Any] = [DeadlineExceeded("the request deadline passed while queued")] * len(requests)
        r = 0
        for k, i in enumerate(live):
            _, t_in, _ = requests[i]
            results[i] = [Prediction(logits[r + j], encs[k][j].tokens, t_start - t_in, tokenize_s, compute_s[k],
                                     len(rows)) for j in range(len(encs[k]))]
            r += len(encs[k])
        return results


def build_application(bundle: str | Path, cfg):
    """The bound application for ``serve.run``: one deployment of :class:`EdgeftReplica`."""
    cfg = cfg.model_copy(update={"keys": Path(cfg.keys).resolve() if cfg.keys is not None else None})
    from edgeft.scale.ray_serve import deployment_options

    return EdgeftReplica.options(**deployment_options(cfg)).bind(str(Path(bundle).resolve()),
                                                                  cfg.model_dump(mode="json"))


def app_builder(args: dict[str, Any]):
    """``serve run ray/serve_config.yaml`` (import_path ``edgeft.scale.ray_app:app_builder``).

    args: ``bundle`` (default: the folder holding ray/, i.e. run it from the bundle folder) and ``set``
    (a list of KEY=VALUE ServeConfig overrides, like ``edgeft serve --set``). The deployment options
    in the config file's ``deployments`` section override the ones derived here, as Ray documents."""
    from edgeft.bundle import read_manifest
    from edgeft.serve.config import resolve_config

    bundle = Path(args.get("bundle") or ".").resolve()
    manifest = read_manifest(bundle)
    serving = manifest.get("serving") if isinstance(manifest.get("serving"), dict) else None
    cfg = resolve_config(serving, None, list(args.get("set") or []))
    host = _serve_http_host()
    if host is not None:  # the same refusal as `edgeft serve`: off loopback only with keys (or said so)
        from edgeft.serve.server import ServeRefused, check_exposure

        try:
            check_exposure(cfg.model_copy(update={"host": host}))
        except ServeRefused as e:
            raise ServeRefused(e.problem, "add \"keys=/path/to/keyfile\" (from `edgeft keys add`) to the application's "
                                          "args.set, set http_options.host: 127.0.0.1, or add "
                                          "\"insecure_no_auth_public=true\" if that is really intended") from None
    return build_application(bundle, cfg)


def _serve_http_host() -> str | None:
    """The host Ray Serve's proxies listen on (http_options.host), when a Serve instance is running.
    Ray has no public getter for it: this reads its client's copy and gives up quietly otherwise."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else str(client.http_config.host)
    except Exception:  # a private API: never let a Ray change break serving
        return None
