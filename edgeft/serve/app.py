"""HTTP routes: KServe V2 (Triton's flavour), TEI-style /predict and /info, health, /metrics.

``build_app(bundle_info, config, engine, metrics)`` returns a Starlette app that knows nothing
about batching: it calls ``engine.predict(texts, deadline)`` (see edgeft/serve/engine.py), so the
same routes, codec, auth and metrics serve the built-in batcher or a Ray Serve deployment.

Order for an inference request: request id -> auth (401) -> rate limit (429) -> readiness
(503) -> admission against ``queue_capacity`` (503 + Retry-After, before any body byte is read)
-> body with size (413) and receipt deadline (408) -> parse (400/413) -> cut texts to
``max_chars`` -> engine (503 on queue full / deadline) -> answer. Health routes and /metrics
need no key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeft import __version__
from edgeft.serve.auth import KeyStore, RateLimiter
from edgeft.serve.codec import CodecError, TooManyItems, check_text, encode_infer, parse_infer
from edgeft.serve.config import ServeConfig
from edgeft.serve.engine import EngineUnavailable
from edgeft.serve.metrics import Metrics

access_log = logging.getLogger("edgeft.serve.access")
log = logging.getLogger("edgeft.serve")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
EXTENSIONS = ["classification", "binary_tensor_data"]


@dataclass
class ModelInfo:
    """What the routes need to know about the served model (no ONNX Runtime objects)."""

    name: str
    version: str
    labels: list[str]
    digest: str
    max_length: int


class HTTPError(Exception):
    def __init__(self, status: int, message: str, reason: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers or {}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class ServerState:
    config: ServeConfig
    info: ModelInfo
    engine: object
    metrics: Metrics
    keys: KeyStore | None = None
    limiter: RateLimiter | None = None
    pending: int = 0
    shutting_down: bool = False
    extra: dict = field(default_factory=dict)

    def ready(self) -> bool:
        ok = bool(self.engine.is_ready()) and not self.shutting_down
        self.metrics.ready.set(1 if ok else 0)
        return ok


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --- the middleware: request id, time split headers, one JSON access-log line ---------------------

class EdgeMiddleware:
    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                try:
                    cand = v.decode("ascii")
                except UnicodeDecodeError:
                    cand = ""
                rid = cand if _SAFE_ID.match(cand) else None
                break
        ctx = {"request_id": rid or uuid.uuid4().hex, "t0": time.monotonic(), "status": 500, "key_id": None,
               "items": None, "tokens": None, "timing": None, "reason": None}
        scope["edgeft"] = ctx

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                ctx["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", ctx["request_id"].encode()))
                t = ctx["timing"]
                if t:
                    headers.append((b"server-timing", ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in t.items()).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            line = {"ts": round(time.time(), 3), "request_id": ctx["request_id"], "key_id": ctx["key_id"],
                    "method": scope.get("method"), "route": scope.get("path", "")[:200], "status": ctx["status"],
                    "items": ctx["items"], "tokens": ctx["tokens"],
                    "ms": round((time.monotonic() - ctx["t0"]) * 1000, 2)}
            if ctx["timing"]:
                line.update({f"{k}_ms": round(v * 1000, 2) for k, v in ctx["timing"].items()})
            if ctx["reason"]:
                line["reason"] = ctx["reason"]
            access_log.info(json.dumps(line, ensure_ascii=True))


# --- helpers -------------------------------------------------------------------------------------

def _authorize(state: ServerState, request: Request) -> None:
    ctx = request.scope["edgeft"]
    if state.keys is not None:
        res = state.keys.check(request.headers.get("authorization"))
        if res.key_id is None:
            state.metrics.auth_failures.inc()
            err = "invalid_request" if res.error in ("missing", "malformed") else "invalid_token"
            msg = {"missing": "missing API key: send 'Authorization: Bearer <key>'",
                   "malformed": "malformed Authorization header: expected 'Bearer <key>'",
                   "invalid": "invalid API key"}[res.error]
            raise HTTPError(401, msg, "auth", {"WWW-Authenticate": f'Bearer realm="edgeft", error="{err}"'})
        ctx["key_id"] = res.key_id
    if state.limiter is not None:
        wait = state.limiter.allow(ctx["key_id"] or "anonymous")
        if wait > 0:
            raise HTTPError(429, f"rate limit exceeded for key {ctx['key_id'] or 'anonymous'}", "rate_limited",
                            {"Retry-After": str(max(1, int(wait + 0.999)))})


def _check_model(state: ServerState, model: str, version: str | None) -> None:
    if model != state.info.name:
        raise HTTPError(404, f"unknown model '{model[:64]}'; this server serves '{state.info.name}'")
    if version is not None and version != state.info.version:
        raise HTTPError(404, f"unknown version '{version[:32]}' of model '{model}'; "
                             f"available: '{state.info.version}'")


async def _read_body(state: ServerState, request: Request) -> bytes:
    cfg = state.config
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise HTTPError(400, "Content-Length is not a number", "invalid")
        if int(cl) > cfg.max_body_bytes:
            raise HTTPError(413, f"body of {cl} bytes is over the {cfg.max_body_bytes}-byte limit (max_body_bytes)",
                            "too_large")
    deadline = request.scope["edgeft"]["t0"] + cfg.receive_timeout_s
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            msg = await asyncio.wait_for(request.receive(), remaining)
        except asyncio.TimeoutError:
            raise HTTPError(408, f"the request body did not arrive within {cfg.receive_timeout_s:g} s "
                                 "(receive_timeout_s)", "timeout", {"Connection": "close"}) from None
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        body = msg.get("body", b"")
        size += len(body)
        if size > cfg.max_body_bytes:
            raise HTTPError(413, f"body is over the {cfg.max_body_bytes}-byte limit (max_body_bytes)", "too_large",
                            {"Connection": "close"})
        chunks.append(body)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def _cut(state: ServerState, texts: list[str]) -> tuple[list[str], list[int]]:
    limit = state.config.max_chars
    cut = [i for i, t in enumerate(texts) if len(t) > limit]
    return ([t[:limit] for t in texts] if cut else texts), cut


async def _run(state: ServerState, request: Request, texts: list[str], deadline: float):
    """engine.predict, cancelled when the client disconnects or the deadline passes."""
    task = asyncio.ensure_future(state.engine.predict(texts, deadline))
    watch = asyncio.ensure_future(request.receive())
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                task.cancel()
                raise HTTPError(503, f"no answer within the request deadline ({state.config.request_timeout_s:g} s)",
                                "timeout", {"Retry-After": "1"})
            done, _ = await asyncio.wait({task, watch}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if watch in done:
                if watch.result().get("type") == "http.disconnect":
                    task.cancel()
                    raise ClientGone()
                watch = asyncio.ensure_future(request.receive())
    except EngineUnavailable as e:
        raise HTTPError(503, str(e) or "the model is unavailable", e.reason, {"Retry-After": "1"}) from None
    finally:
        watch.cancel()


def _record(state: ServerState, ctx: dict, preds, started: float) -> None:
    m = state.metrics
    p = preds[0]
    ctx["timing"] = {"queue": p.queue_s, "tokenize": p.tokenize_s, "compute": p.compute_s}
    ctx["tokens"] = sum(x.tokens for x in preds)
    m.queue_duration.observe(p.queue_s)
    m.tokenize_duration.observe(p.tokenize_s)
    m.compute_duration.observe(p.compute_s)
    m.request_duration.observe(time.monotonic() - started)


async def _inference(state: ServerState, request: Request, handler):
    """Shared frame of the inference routes: status accounting, admission, errors."""
    ctx = request.scope["edgeft"]
    m = state.metrics
    admitted = False
    try:
        _authorize(state, request)
        await handler.check(state, request)
        if not state.ready():
            raise HTTPError(503, "the model is not ready (warming up or shutting down)", None, {"Retry-After": "1"})
        if state.pending >= state.config.queue_capacity:
            raise HTTPError(503, f"server busy: {state.pending} requests pending (queue_capacity "
                                 f"{state.config.queue_capacity}); retry later", "queue_full", {"Retry-After": "1"})
        state.pending += 1
        admitted = True
        m.pending.inc()
        body = await _read_body(state, request)
        resp = await handler.run(state, request, body, ctx["t0"] + state.config.request_timeout_s)
    except HTTPError as e:
        ctx["reason"] = e.reason
        if e.reason:
            m.rejections.labels(e.reason).inc()
        resp = handler.error(e)
    except ClientGone:
        ctx["reason"] = "client_gone"
        resp = Response(status_code=499)  # nobody reads it; recorded as 499 like nginx
    except Exception as e:  # a bug or a failed inference: one log line (no text, no key), 500, keep serving
        log.error("internal error on %s: %s: %s", request.url.path[:200], type(e).__name__, str(e)[:200])
        resp = handler.error(HTTPError(500, "internal server error"))
    finally:
        if admitted:
            state.pending -= 1
            m.pending.dec()
    m.requests.labels(str(resp.status_code)).inc()
    return resp


class _V2:
    async def check(self, state, request):
        p = request.path_params
        _check_model(state, p["model"], p.get("version"))

    def error(self, e: HTTPError):
        return _error(e.status, e.message, e.headers)

    async def run(self, state, request, body, deadline):
        ctx = request.scope["edgeft"]
        try:
            req = parse_infer(body, request.headers.get("inference-header-content-length"),
                              max_items=state.config.max_items)
        except TooManyItems as e:
            raise HTTPError(413, str(e), "too_large") from None
        except CodecError as e:
            raise HTTPError(400, str(e), "invalid") from None
        ctx["items"] = len(req.texts)
        texts, cut = _cut(state, req.texts)
        preds = await _run(state, request, texts, deadline)
        _record(state, ctx, preds, ctx["t0"])
        logits = np.stack([p.logits for p in preds])
        params = {"truncated": bool(cut)}
        if cut:
            params["truncated_items"] = ",".join(map(str, cut))
            params["max_chars"] = state.config.max_chars
        body, headers = encode_infer(req, logits, state.info.labels, model=state.info.name,
                                     version=state.info.version, parameters=params)
        return Response(body, status_code=200, headers=headers)


class _TEI:
    async def check(self, state, request):
        return None

    def error(self, e: HTTPError):
        kind = {400: "Validation", 413: "Validation", 401: "Unauthorized", 429: "Overloaded", 503: "Overloaded",
                408: "Validation"}.get(e.status, "Backend")
        return JSONResponse({"error": e.message, "error_type": kind}, status_code=e.status, headers=e.headers)

    async def run(self, state, request, body, deadline):
        ctx = request.scope["edgeft"]
        try:
            req = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"the request body is not valid JSON ({type(e).__name__})", "invalid") from None
        except RecursionError:
            raise HTTPError(400, "the request body is nested too deeply", "invalid") from None
        if not isinstance(req, dict) or "inputs" not in req:
            raise HTTPError(400, "expected a JSON object {\"inputs\": \"text\"} or {\"inputs\": [\"a\", \"b\"]}", "invalid")
        unknown = set(req) - {"inputs", "raw_scores", "truncate"}
        if unknown:
            raise HTTPError(400, f"unknown field(s) {sorted(unknown)}; allowed: inputs, raw_scores, truncate", "invalid")
        single = isinstance(req["inputs"], str)
        texts = [req["inputs"]] if single else req["inputs"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise HTTPError(400, "'inputs' must be a string or a non-empty list of strings", "invalid")
        if len(texts) > state.config.max_items:
            raise HTTPError(413, f"{len(texts)} texts in one request; the limit is {state.config.max_items} "
                                 "(max_items): split the request", "too_large")
        try:
            texts = [check_text(t, i) for i, t in enumerate(texts)]
        except CodecError as e:
            raise HTTPError(400, str(e), "invalid") from None
        ctx["items"] = len(texts)
        texts, cut = _cut(state, texts)
        preds = await _run(state, request, texts, deadline)
        _record(state, ctx, preds, ctx["t0"])
        logits = np.stack([p.logits for p in preds]).astype(np.float64)
        if req.get("raw_scores") is True:
            scores = logits
        else:
            e = np.exp(logits - logits.max(-1, keepdims=True))
            scores = e / e.sum(-1, keepdims=True)
        labels = state.info.labels
        out = [[{"label": labels[j], "score": float(row[j])} for j in np.argsort(-row, kind="stable")] for row in scores]
        headers = {"X-Truncated-Items": ",".join(map(str, cut))} if cut else None
        return JSONResponse(out[0] if single else out, headers=headers)


def health_handlers(state: ServerState):
    """The routes every edgeft server has, keyless: live, ready (503 until warmed up and while draining),
    /health (TEI), /metrics (Prometheus)."""

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        ok = state.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def health(request):
        ok = state.ready()
        return Response(status_code=200 if ok else 503)

    async def metrics_route(request):
        state.ready()
        state.metrics.pending.set(state.pending)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), headers={"content-type": CONTENT_TYPE_LATEST})

    return live, ready, health, metrics_route


def build_app(info: ModelInfo, config: ServeConfig, engine, metrics: Metrics | None = None,
              keys: KeyStore | None = None):
    """The ASGI app (routes wrapped in the request-id / access-log middleware); its ``.state`` is the
    ServerState (set ``state.shutting_down`` on SIGTERM, call ``state.keys.reload()`` on SIGHUP).
    Pass ``metrics.observe_batch`` to the engine so batches are counted."""
    metrics = metrics or Metrics(latency_budget_s=config.latency_budget_ms / 1000, queue_capacity=config.queue_capacity)
    metrics.build_info.labels(__version__, info.digest, info.name).set(1)
    if keys is None and config.keys is not None:
        keys = KeyStore(config.keys)  # never serve without the keys the config names
    limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst) if config.rate_limit_rps > 0 else None
    state = ServerState(config, info, engine, metrics, keys, limiter)

    live, ready, health, metrics_route = health_handlers(state)

    async def server_meta(request):
        try:
            _authorize(state, request)
        except HTTPError as e:
            return _error(e.status, e.message, e.headers)
        return JSONResponse({"name": "edgeft", "version": __version__, "extensions": EXTENSIONS})

    def model_meta_body():
        return {"name": info.name, "versions": [info.version], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(info.labels)]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"labels": ",".join(info.labels), "bundle_digest": info.digest}}

    async def model_meta(request):
        try:
            _authorize(state, request)
            _check_model(state, request.path_params["model"], request.path_params.get("version"))
        except HTTPError as e:
            return _error(e.status, e.message, e.headers)
        return JSONResponse(model_meta_body())

    async def model_ready(request):
        try:
            _authorize(state, request)
            _check_model(state, request.path_params["model"], request.path_params.get("version"))
        except HTTPError as e:
            return _error(e.status, e.message, e.headers)
        ok = state.ready()
        return JSONResponse({"name": info.name, "ready": ok}, status_code=200 if ok else 503)

    v2, tei = _V2(), _TEI()

    async def infer(request):
        return await _inference(state, request, v2)

    async def predict(request):
        return await _inference(state, request, tei)

    async def info_route(request):
        try:
            _authorize(state, request)
        except HTTPError as e:
            return _error(e.status, e.message, e.headers)
        return JSONResponse({"model_id": info.name, "model_version": info.version, "model_sha": info.digest,
                             "model_type": {"classifier": {"id2label": dict(enumerate(info.labels))}},
                             "max_input_length": info.max_length, "max_client_batch_size": config.max_items,
                             "max_batch_tokens": config.max_batch_tokens, "max_batch_requests": config.max_batch_size,
                             "max_concurrent_requests": config.queue_capacity, "version": __version__})

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        if status == 405:
            allow = (getattr(exc, "headers", None) or {}).get("Allow", "")
            return _error(405, f"method {request.method} not allowed on {request.url.path[:200]}; use {allow}",
                          {"Allow": allow} if allow else None)
        return _error(status, f"no route {request.method} {request.url.path[:200]}")

    async def internal(request, exc):
        log.error("internal error on %s: %s", request.url.path[:200], type(exc).__name__)
        return _error(500, "internal server error")

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_meta),
        Route("/v2/models/{model}", model_meta), Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]), Route("/info", info_route), Route("/health", health),
        Route("/metrics", metrics_route),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: internal})
    app.state.edgeft = state
    return EdgeMiddleware(app, state)
