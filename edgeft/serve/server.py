"""Process lifecycle: open the bundle, load, warm up, serve with uvicorn, drain on SIGTERM.

- The bundle's checksums are verified before any model file is parsed (open_bundle).
- /v2/health/ready answers 503 until the warm-up batches ran.
- A text-generation bundle (a decoder LM) gets the OpenAI-compatible routes (edgeft.serve.completions)
  on the same process, auth, limits, log and metrics; a classification bundle the KServe V2 / TEI ones.
- SIGTERM / SIGINT: readiness goes to 503 at once, uvicorn stops accepting, queued and
  in-flight requests finish (up to ``shutdown_timeout_s``), the worker drains, exit 0.
- SIGHUP re-reads the key file (a bad file keeps the old keys and logs why).
- uvicorn has no deadline for receiving a request's headers: the protocol below closes a
  connection whose request line and headers do not arrive within ``receive_timeout_s``
  (the app enforces the same deadline on the body, answering 408).
"""

from __future__ import annotations

import asyncio
import calendar
import ipaddress
import json
import logging
import signal
import sys
import time
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.serve.config import ServeConfig

log = logging.getLogger("edgeft.serve")


class ServeRefused(EdgeftError):
    """The server refuses to start with these settings: exit code 2."""


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "edgeft.serve.access":
            return record.getMessage()  # already a JSON object
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        return json.dumps(out, ensure_ascii=True)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True  # our access line replaces it


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServeConfig) -> None:
    if not is_loopback(config.host) and config.keys is None and not config.insecure_no_auth_public:
        raise ServeRefused(f"refusing to listen on {config.host} without API keys: anyone who can reach it could use it",
                           "pass --keys FILE (create one with `edgeft keys add FILE`), bind 127.0.0.1, or pass "
                           "--insecure-no-auth-public if that is really intended")


def header_deadline_protocol(timeout_s: float, parser: str = "auto"):
    """uvicorn's HTTP protocol with a deadline for a request's line and headers: the httptools (C
    parser) one where installed (``bench/serve_http_ab.py`` measures it against h11), else the
    pure-Python h11 one."""
    Base = None
    if parser in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
        except ImportError:
            if parser == "httptools":
                raise ServeRefused("http: httptools is not installed", "pip install httptools, or set http: h11") from None
    if Base is None:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class DeadlineH11Protocol(Base):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._hdr_timer = None
            self._arm()

        def _arm(self):
            self._hdr_cycle = self.cycle
            self._hdr_timer = self.loop.call_later(timeout_s, self._hdr_expired)

        def _disarm(self):
            if self._hdr_timer is not None:
                self._hdr_timer.cancel()
                self._hdr_timer = None

        def data_received(self, data: bytes) -> None:
            if self._hdr_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # bytes of a new request on a kept-alive connection
            super().data_received(data)
            if self._hdr_timer is not None and self.cycle is not self._hdr_cycle:
                self._disarm()  # the headers are in: the app's body deadline takes over

        def _hdr_expired(self):
            self._hdr_timer = None
            if self.cycle is self._hdr_cycle and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers did not arrive in %.1f s", timeout_s)
                self.transport.close()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return DeadlineH11Protocol


def process_age_s() -> float:
    """Seconds since this process started, from /proc in one clock (psutil's create_time adds the boot
    time, which /proc/stat gives to the whole second: up to 1 s off)."""
    import os

    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        import psutil

        return time.time() - psutil.Process().create_time()


def build_generation(bundle, config: ServeConfig, keys):
    """A text-generation bundle: its decoder (a KV-cache ONNX model), tokenizer, generation engine and the
    OpenAI-compatible app (edgeft.serve.completions)."""
    from edgeft.decoder.generate import OrtDecoder
    from edgeft.decoder.text import DecoderTokenizer
    from edgeft.serve.completions import GenerationInfo, build_generation_app
    from edgeft.serve.generation import GenerationEngine
    from edgeft.serve.metrics import Metrics

    if config.engine != "embedded":
        raise ServeRefused(f"engine: {config.engine} serves text-classification bundles only; this bundle is a "
                           "text-generation model", "serve it with engine: embedded (the default)")
    decoder = OrtDecoder(bundle.onnx_path, threads=config.threads, spinning=config.ort_spinning)
    tokenizer = DecoderTokenizer(bundle.model_dir)
    try:
        context = bundle.context_length
    except (KeyError, TypeError, ValueError):
        raise ServeRefused("the bundle's manifest has no model.context_length", "re-ship the bundle") from None
    if context != decoder.context:
        raise ServeRefused(f"the manifest says a context of {context} tokens, model/config.json {decoder.context}",
                           "re-ship the bundle")
    metrics = Metrics(latency_budget_s=config.latency_budget_ms / 1000, queue_capacity=config.queue_capacity,
                      generation=True)
    engine = GenerationEngine(decoder, tokenizer, slots=config.generation_slots, queue_capacity=config.queue_capacity,
                              warmup=config.warmup_batches, metrics=metrics)
    created = bundle.manifest.get("created")
    try:
        created_unix = calendar.timegm(time.strptime(str(created), "%Y-%m-%dT%H:%M:%SZ"))
    except (ValueError, OverflowError):
        created_unix = 0
    info = GenerationInfo(bundle.name, bundle.version, bundle.digest, context, created_unix,
                          tokenizer.chat_template is not None)
    return build_generation_app(info, config, engine, tokenizer, metrics, keys), engine


def build_server(bundle_path: str | Path, config: ServeConfig):
    """Open, check and load everything; return (uvicorn.Server, engine, state). Raises EdgeftError."""
    import uvicorn

    from edgeft.bundle import TASK_GENERATION, open_bundle
    from edgeft.serve.app import ModelInfo, build_app
    from edgeft.serve.auth import KeyStore
    from edgeft.serve.batcher import BatchingEngine
    from edgeft.serve.metrics import Metrics
    from edgeft.serve.runner import ModelRunner

    check_exposure(config)
    keys = KeyStore(config.keys) if config.keys is not None else None
    bundle = open_bundle(bundle_path)  # checksums first: a tampered bundle is never parsed
    if bundle.task == TASK_GENERATION:
        app, engine = build_generation(bundle, config, keys)
    else:
        max_length = config.max_length or bundle.max_length
        runner = ModelRunner(bundle.model_dir, bundle.onnx_path, max_length=max_length, threads=config.threads,
                             spinning=config.ort_spinning)
        if runner.num_labels is not None and runner.num_labels != len(bundle.labels):
            raise ServeRefused(f"the model has {runner.num_labels} outputs but the bundle lists {len(bundle.labels)} "
                               "labels", "re-ship the bundle")
        metrics = Metrics(latency_budget_s=config.latency_budget_ms / 1000, queue_capacity=config.queue_capacity)
        engine = BatchingEngine(runner, bundle.labels, max_batch_size=config.max_batch_size,
                                max_batch_tokens=config.max_batch_tokens, max_queue_delay_ms=config.max_queue_delay_ms,
                                queue_capacity=config.queue_capacity, warmup_batches=config.warmup_batches,
                                on_batch=metrics.observe_batch)
        info = ModelInfo(bundle.name, bundle.version, bundle.labels, bundle.digest, max_length)
        app = build_app(info, config, engine, metrics, keys)
        engine.admitted = lambda: app.state.pending  # requests admitted by the HTTP layer, answered or not
    ucfg = uvicorn.Config(app, host=config.host, port=config.port, http=header_deadline_protocol(config.receive_timeout_s, config.http),
                          lifespan="off", log_config=None, access_log=False, server_header=False,
                          timeout_keep_alive=int(max(1, config.keep_alive_s)), limit_concurrency=config.max_connections,
                          timeout_graceful_shutdown=int(max(1, config.shutdown_timeout_s)),
                          h11_max_incomplete_event_size=16 * 1024)
    state = app.state

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not state.shutting_down:
                state.shutting_down = True  # readiness 503 at once
                log.info("signal %s: not ready, draining queued and in-flight requests", signal.Signals(sig).name)
            super().handle_exit(sig, frame)

    log.info("serving %s %s (bundle digest %s) with config %s", bundle.name, bundle.version, bundle.digest,
             json.dumps(config.public_dict()))
    return Server(ucfg), engine, state


def serve(bundle_path: str | Path, config: ServeConfig) -> int:
    """Run the server until SIGTERM/SIGINT; return the exit code (0 after a clean drain)."""
    setup_logging(config.log_level)
    holder = {}

    def _after(sig, frame):  # uvicorn re-raises the signal it handled once it has drained: ignore that one
        st = holder.get("state")
        if st is None or not st.shutting_down:
            raise SystemExit(128 + sig)

    signal.signal(signal.SIGTERM, _after)
    server, engine, state = build_server(bundle_path, config)
    holder["state"] = state
    engine.start()

    async def main():
        loop = asyncio.get_running_loop()
        if state.keys is not None:
            def reload():
                try:
                    n = state.keys.reload()
                    log.info("SIGHUP: reloaded %d API keys from %s", n, state.keys.path)
                except EdgeftError as e:
                    log.error("SIGHUP: key reload failed, keeping the old keys: %s", e.one_line())
            loop.add_signal_handler(signal.SIGHUP, reload)

        async def announce():
            while not server.started:
                await asyncio.sleep(0.02)
            sock = server.servers[0].sockets[0].getsockname()
            log.info("listening on http://%s:%s", sock[0], sock[1])
            while not engine.is_ready():
                await asyncio.sleep(0.05)
            log.info("ready %.2f s after the process started", process_age_s())

        t = asyncio.ensure_future(announce())
        try:
            await server.serve()
        finally:
            t.cancel()

    try:
        if config.loop in ("auto", "uvloop"):  # bench/serve_http_ab.py measures it against asyncio's loop
            try:
                import uvloop

                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            except ImportError:
                if config.loop == "uvloop":
                    raise ServeRefused("loop: uvloop is not installed", "pip install uvloop, or set loop: asyncio") from None
        asyncio.run(main())
    finally:
        engine.stop(timeout=config.shutdown_timeout_s)
    log.info("stopped")
    return 0
