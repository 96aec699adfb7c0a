"""OpenAI-compatible routes for a text-generation bundle: GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (``stream: true`` answers Server-Sent Events in OpenAI's chunk format,
ending ``data: [DONE]``), plus the keyless health routes and /metrics every edgeft server has.

Order for a generation request (as the classification routes): request id -> auth (401) -> rate limit
(429) -> readiness (503) -> admission against ``queue_capacity`` (503 + Retry-After, before any body
byte is read) -> body with size (413) and receipt deadline (408) -> parse (400) -> model (404) ->
prompt: chat template, tokens, context and max_tokens limits (400) -> queue (503) -> the worker takes
it within ``request_timeout_s`` (else 503) -> answer, or stream. The admission slot is held until the
answer is complete: for a stream, until its last event is sent or its client left (which also stops
the generation before its next model step).

Parameters: ``max_tokens`` (chat also ``max_completion_tokens``; default ``default_max_tokens``, at most
``max_new_tokens`` and the context), ``temperature`` (OpenAI's default 1; 0 = greedy), ``top_p``,
``seed``, ``stop`` (a string or up to :data:`MAX_STOP` strings), ``n`` (1 only),
``stream_options.include_usage``. Parameters this server cannot honour (penalties, logprobs, tools,
n > 1, ...) are a 400 naming them, never silently ignored. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeft import __version__
from edgeft.serve.app import ClientGone, EdgeMiddleware, HTTPError, ServerState, _authorize, _read_body, health_handlers
from edgeft.serve.auth import KeyStore, RateLimiter
from edgeft.serve.config import ServeConfig
from edgeft.serve.engine import EngineUnavailable
from edgeft.serve.metrics import Metrics

log = logging.getLogger("edgeft.serve")

MAX_STOP = 4                 # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256
ROLES = ("system", "user", "assistant", "developer", "tool")
# Accepted only at their no-op value: anything else asks for something this server does not do.
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False, 0), "top_logprobs": (0,),
           "echo": (False,), "best_of": (1,), "suffix": ("",), "logit_bias": ({},), "tools": ([],), "functions": ([],),
           "tool_choice": ("none",), "function_call": ("none",), "modalities": (["text"],)}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "reasoning_effort"}
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
          "response_format"}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "invalid_request_error", 500: "server_error", 503: "server_error"}
ERROR_CODES = {"auth": "invalid_api_key", "rate_limited": "rate_limit_exceeded", "too_large": "request_too_large",
               "timeout": "timeout", "queue_full": "server_busy"}


@dataclass
class GenerationInfo:
    """What the routes need to know about the served decoder (no ONNX Runtime objects)."""

    name: str
    version: str
    digest: str
    context_length: int
    created_unix: int
    has_chat_template: bool


class ApiError(HTTPError):
    """An HTTPError with OpenAI's ``param`` and ``code`` fields."""

    def __init__(self, status: int, message: str, reason: str | None = None, headers: dict | None = None, *,
                 param: str | None = None, code: str | None = None):
        super().__init__(status, message, reason, headers)
        self.param, self.code = param, code


class BadRequest(ApiError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(400, message, "invalid", param=param, code=code)


def _unknown_model(name: str, served: str) -> ApiError:
    return ApiError(404, f"the model '{name[:64]}' does not exist; this server serves '{served}' (GET /v1/models)",
                    code="model_not_found", param="model")


def error_response(e: HTTPError) -> JSONResponse:
    code = getattr(e, "code", None) or ERROR_CODES.get(e.reason or "")
    body = {"error": {"message": e.message, "type": ERROR_TYPES.get(e.status, "server_error"),
                      "param": getattr(e, "param", None), "code": code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers or None)


# --- parsing -------------------------------------------------------------------------------------

def _number(req: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = req.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo):
        raise BadRequest(f"'{key}' must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {json.dumps(v)[:40]}",
                         key)
    return float(v)


def _int(req: dict, key: str, lo: int | None = None) -> int | None:
    v = req.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        raise BadRequest(f"'{key}' must be an integer{f' >= {lo}' if lo is not None else ''}, got {json.dumps(v)[:40]}",
                         key)
    return v


def _stop(req: dict) -> tuple[str, ...]:
    v = req.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > MAX_STOP \
            or any(len(s) > MAX_STOP_CHARS for s in items):
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings of at "
                         f"most {MAX_STOP_CHARS} characters", "stop")
    return tuple(items)


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported (type 'text')", "messages")
            texts.append(p["text"])
        return "".join(texts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")


@dataclass
class ParsedRequest:
    kind: str  # completion | chat
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None


def parse_request(body: bytes, kind: str) -> ParsedRequest:
    """The request body -> ParsedRequest; BadRequest (400) naming the parameter otherwise."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({type(e).__name__})") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(req, dict):
        raise BadRequest("the request body must be a JSON object")
    allowed = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
    unknown = sorted(set(req) - allowed - set(NEUTRAL) - IGNORED)
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)[:200]}", unknown[0])
    for key, neutral in NEUTRAL.items():
        v = req.get(key)
        if v is not None and v not in neutral:
            raise BadRequest(f"'{key}' is not supported by this server (only {json.dumps(neutral[0])} or null)", key)
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: the served model's name (GET /v1/models)", "model")
    n = _int(req, "n", 1)
    if n is not None and n != 1:
        raise BadRequest(f"n={n}: this server generates one choice per request (n must be 1)", "n")
    stream = req.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    opts = req.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}
                             or not isinstance(opts.get("include_usage", False), bool)):
        raise BadRequest("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    fmt = req.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")
    max_tokens = _int(req, "max_tokens", 1)
    if kind == "chat":
        mct = _int(req, "max_completion_tokens", 1)
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise BadRequest("give max_completion_tokens or max_tokens, not two different values", "max_tokens")
        max_tokens = mct if mct is not None else max_tokens
    out = ParsedRequest(kind, model, stream, bool((opts or {}).get("include_usage", False)), max_tokens,
                        _number(req, "temperature", 1.0, 0.0, 2.0), _number(req, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                        _int(req, "seed"), _stop(req))
    if kind == "completion":
        p = req.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            out.prompt = p
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
            out.prompt = [int(t) for t in p]
        elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
            raise BadRequest(f"a batch of {len(p)} prompts: this server takes one prompt per request", "prompt")
        else:
            raise BadRequest("'prompt' must be a string, a list of token ids, or a list of one of those", "prompt")
    else:
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"}", "messages")
        clean = []
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES:
                raise BadRequest(f"messages[{i}] needs a role among {', '.join(ROLES)}", "messages")
            role = "system" if msg["role"] == "developer" else msg["role"]  # OpenAI's new name for system
            extra = {k: v for k, v in msg.items() if k == "name" and isinstance(v, str)}
            clean.append({"role": role, "content": _message_text(msg.get("content"), i), **extra})
        out.messages = clean
    return out


# --- the generation frame ------------------------------------------------------------------------

class _Slot:
    """One admission slot (``state.pending``), released exactly once."""

    def __init__(self, state: ServerState):
        self.state, self.held = state, False

    def take(self) -> None:
        self.state.pending += 1
        self.state.metrics.pending.inc()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.pending -= 1
            self.state.metrics.pending.dec()


class _Watch:
    """Awaits a job's next event while watching for the client's disconnect."""

    def __init__(self, request):
        self.request, self.task = request, None

    async def next(self, job, timeout: float | None = None):
        get = asyncio.ensure_future(job.events.get())
        try:
            while True:
                if self.task is None:
                    self.task = asyncio.ensure_future(self.request.receive())
                done, _ = await asyncio.wait({get, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    return get.result()
                if not done:
                    raise asyncio.TimeoutError
                msg, self.task = self.task.result(), None
                if msg.get("type") == "http.disconnect":
                    raise ClientGone()
        finally:
            if not get.done():
                get.cancel()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None


class SSEResponse(StreamingResponse):
    """A text/event-stream response that runs ``on_close`` once it is over: sent, failed, or its client
    left (even before the first chunk was asked for)."""

    def __init__(self, content, on_close, headers=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.on_close()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _Generator:
    """The two generation routes (kind completion | chat)."""

    def __init__(self, state: ServerState, tokenizer, kind: str):
        self.state, self.tok, self.kind = state, tokenizer, kind

    def _prepare(self, req: ParsedRequest) -> list[int]:
        """Prompt token ids (in a worker thread: templates and tokenizers take CPU)."""
        from edgeft.errors import DataError

        if req.kind == "chat":
            try:
                return self.tok.encode_chat(req.messages)
            except DataError as e:
                raise BadRequest(e.problem, "messages") from None
        if isinstance(req.prompt, list):
            vocab = self.tok.vocab_size
            if any(t >= vocab for t in req.prompt):
                raise BadRequest(f"prompt token ids must be below the vocabulary size {vocab}", "prompt")
            return list(req.prompt)
        return self.tok.encode(req.prompt, add_special_tokens=True)

    def _limits(self, req: ParsedRequest, n: int) -> int:
        cfg, context = self.state.config, self.state.info.context_length
        param = "messages" if req.kind == "chat" else "prompt"
        if n == 0:
            raise BadRequest("the prompt is empty (0 tokens)", param)
        if n >= context:
            raise BadRequest(f"the prompt has {n} tokens; the model's context is {context} tokens, which must hold the "
                             "prompt and at least one new token: shorten the prompt", param, "context_length_exceeded")
        if req.max_tokens is None:
            return min(cfg.default_max_tokens, cfg.max_new_tokens, context - n)
        if req.max_tokens > cfg.max_new_tokens:
            raise BadRequest(f"max_tokens {req.max_tokens} is over this server's limit of {cfg.max_new_tokens} "
                             "(max_new_tokens)", "max_tokens")
        if n + req.max_tokens > context:
            raise BadRequest(f"the prompt has {n} tokens and max_tokens is {req.max_tokens}: {n + req.max_tokens} tokens "
                             f"exceed the model's context of {context}; ask for at most {context - n} new tokens or "
                             "shorten the prompt", "max_tokens", "context_length_exceeded")
        return req.max_tokens

    async def __call__(self, request):
        from edgeft.decoder.generate import Sampling
        from edgeft.serve.generation import GenerationRequest

        state, cfg = self.state, self.state.config
        ctx, m = request.scope["edgeft"], state.metrics
        slot, watch, job, streaming = _Slot(state), _Watch(request), None, False
        try:
            _authorize(state, request)
            if not state.ready():
                raise HTTPError(503, "the model is not ready (warming up or shutting down)", None, {"Retry-After": "1"})
            if state.pending >= cfg.queue_capacity:
                raise HTTPError(503, f"server busy: {state.pending} requests pending (queue_capacity "
                                     f"{cfg.queue_capacity}); retry later", "queue_full", {"Retry-After": "1"})
            slot.take()
            body = await _read_body(state, request)
            req = parse_request(body, self.kind)
            if req.model != state.info.name:
                raise _unknown_model(req.model, state.info.name)
            if req.kind == "chat" and not state.info.has_chat_template:
                raise BadRequest(f"model '{state.info.name}' has no chat template (its tokenizer files hold none), so "
                                 "/v1/chat/completions cannot format messages: use /v1/completions with a plain prompt",
                                 "messages", "chat_template_missing")
            t_tok = time.perf_counter()
            prompt_ids = await asyncio.to_thread(self._prepare, req)
            tokenize_s = time.perf_counter() - t_tok
            max_tokens = self._limits(req, len(prompt_ids))
            ctx["items"] = 1
            gen = GenerationRequest(prompt_ids, max_tokens, Sampling(req.temperature if req.temperature > 0 else 0.0,
                                                                     req.top_p, req.seed), req.stop)
            deadline = ctx["t0"] + cfg.request_timeout_s
            job = state.engine.submit(gen, deadline=deadline, t_admitted=ctx["t0"])
            try:
                kind, payload = await watch.next(job, timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPError(503, f"no generation slot within the request deadline ({cfg.request_timeout_s:g} s, "
                                     "request_timeout_s)", "timeout", {"Retry-After": "1"}) from None
            if kind == "error":
                raise payload
            queue_s = payload
            m.queue_duration.observe(queue_s)
            m.tokenize_duration.observe(tokenize_s)
            meta = self._meta(ctx)
            if req.stream:
                watch.close()  # the streaming response watches for the disconnect from here on
                streaming = True
                return SSEResponse(self._chunks(req, job, meta, len(prompt_ids)),
                                   on_close=lambda: self._closed(request, job, slot, len(prompt_ids)))
            parts = []
            while True:
                kind, payload = await watch.next(job)
                if kind == "text":
                    parts.append(payload)
                elif kind == "error":
                    raise payload
                elif kind == "done":
                    break
            fin = payload
            ctx["tokens"] = len(prompt_ids) + fin.completion_tokens
            ctx["timing"] = {"queue": queue_s, "tokenize": tokenize_s, "generate": fin.generate_s}
            m.compute_duration.observe(fin.generate_s)
            return JSONResponse(self._body(req, meta, "".join(parts), fin, len(prompt_ids)))
        except HTTPError as e:
            ctx["reason"] = e.reason
            if e.reason:
                m.rejections.labels(e.reason).inc()
            return error_response(e)
        except EngineUnavailable as e:
            ctx["reason"] = e.reason
            m.rejections.labels(e.reason).inc()
            return error_response(HTTPError(503, str(e) or "the model is unavailable", e.reason, {"Retry-After": "1"}))
        except ClientGone:
            ctx["reason"] = "client_gone"
            return Response(status_code=499)  # nobody reads it; recorded as 499 like nginx
        except Exception as e:  # a bug or a failed generation: one log line (no prompt, no key), 500, keep serving
            log.error("internal error on %s: %s: %s", request.url.path[:200], type(e).__name__, str(e)[:200])
            return error_response(HTTPError(500, "internal server error"))
        finally:
            watch.close()
            if not streaming:
                if job is not None:
                    job.cancel.set()  # a no-op once it is done; stops it when this request failed or left
                slot.release()

    # -- answers ---------------------------------------------------------------------------------
    def _meta(self, ctx) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        return {"id": prefix + ctx["request_id"], "created": int(time.time()), "model": self.state.info.name,
                "system_fingerprint": "edgeft-" + self.state.info.digest[:16]}

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _finish(self, fin) -> str:
        return "stop" if fin.finish_reason == "stop" else "length"

    def _body(self, req: ParsedRequest, meta: dict, text: str, fin, prompt_tokens: int) -> dict[str, Any]:
        if req.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self._finish(fin)}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self._finish(fin)}
            obj = "text_completion"
        return {**meta, "object": obj, "choices": [choice], "usage": self._usage(prompt_tokens, fin.completion_tokens)}

    async def _chunks(self, req: ParsedRequest, job, meta: dict, prompt_tokens: int):
        chat = req.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            out = {**meta, "object": obj, "choices": [choice]}
            if req.include_usage:
                out["usage"] = None
            return _sse(out)

        if chat:
            yield chunk(None, None, first=True)
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                yield chunk(payload, None)
            elif kind == "error":  # after the 200 went out: an error event, then the end (OpenAI does so)
                yield _sse({"error": {"message": str(payload), "type": "server_error", "param": None, "code": None}})
                break
            elif kind == "done":
                yield chunk(None, self._finish(payload))
                if req.include_usage:
                    yield _sse({**meta, "object": obj, "choices": [],
                                "usage": self._usage(prompt_tokens, payload.completion_tokens)})
                break
        yield b"data: [DONE]\n\n"

    def _closed(self, request, job, slot: _Slot, prompt_tokens: int) -> None:
        """A stream is over (sent, failed or abandoned): stop its generation, free its slot, count it."""
        ctx, m = request.scope["edgeft"], self.state.metrics
        job.cancel.set()
        slot.release()
        fin = job.finished
        if fin is None or fin.finish_reason == "cancelled":
            ctx["reason"] = "client_gone"
        else:
            ctx["tokens"] = prompt_tokens + fin.completion_tokens
            m.compute_duration.observe(fin.generate_s)
        m.request_duration.observe(time.monotonic() - ctx["t0"])
        m.requests.labels(str(ctx["status"])).inc()


def build_generation_app(info: GenerationInfo, config: ServeConfig, engine, tokenizer, metrics: Metrics | None = None,
                         keys: KeyStore | None = None):
    """The ASGI app of a text-generation bundle (routes wrapped in the request-id / access-log middleware);
    its ``.state`` is the ServerState, as build_app's."""
    metrics = metrics or Metrics(latency_budget_s=config.latency_budget_ms / 1000, queue_capacity=config.queue_capacity,
                                 generation=True)
    metrics.build_info.labels(__version__, info.digest, info.name).set(1)
    if keys is None and config.keys is not None:
        keys = KeyStore(config.keys)
    limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst) if config.rate_limit_rps > 0 else None
    state = ServerState(config, info, engine, metrics, keys, limiter)
    live, ready, health, metrics_route = health_handlers(state)
    completions, chat = _Generator(state, tokenizer, "completion"), _Generator(state, tokenizer, "chat")

    def model_card() -> dict[str, Any]:
        return {"id": info.name, "object": "model", "created": info.created_unix, "owned_by": "edgeft",
                "version": info.version, "context_length": info.context_length, "bundle_digest": info.digest}

    async def counted(request, handler):
        resp = await handler(request)
        if not isinstance(resp, SSEResponse):  # a stream is counted when it ends (SSEResponse.on_close)
            state.metrics.requests.labels(str(resp.status_code)).inc()
            state.metrics.request_duration.observe(time.monotonic() - request.scope["edgeft"]["t0"])
        return resp

    async def completions_route(request):
        return await counted(request, completions)

    async def chat_route(request):
        return await counted(request, chat)

    async def models(request):
        try:
            _authorize(state, request)
        except HTTPError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request):
        try:
            _authorize(state, request)
            if request.path_params["model"] != info.name:
                raise _unknown_model(request.path_params["model"], info.name)
        except HTTPError as e:
            return error_response(e)
        return JSONResponse(model_card())

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        if status == 405:
            allow = (getattr(exc, "headers", None) or {}).get("Allow", "")
            return error_response(HTTPError(405, f"method {request.method} not allowed on {request.url.path[:200]}; "
                                                 f"use {allow}", None, {"Allow": allow} if allow else None))
        return error_response(HTTPError(status, f"no route {request.method} {request.url.path[:200]}"))

    async def internal(request, exc):
        log.error("internal error on %s: %s", request.url.path[:200], type(exc).__name__)
        return error_response(HTTPError(500, "internal server error"))

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/health", health),
        Route("/metrics", metrics_route),
        Route("/v1/models", models), Route("/v1/models/{model:path}", model),
        Route("/v1/completions", completions_route, methods=["POST"]),
        Route("/v1/chat/completions", chat_route, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: internal})
    app.state.edgeft = state
    return EdgeMiddleware(app, state)
