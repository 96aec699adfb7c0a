"""Serve settings: one typed, strictly validated model (like recipes).

Resolution order, later wins: field defaults -> the bundle manifest's ``serving`` section
-> the ``--config`` YAML file -> ``--set KEY=VALUE`` -> explicit CLI flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeft.errors import EdgeftError


class ServeConfigError(EdgeftError):
    """The serve config, an override or a flag is invalid: exit code 2."""


class RayConfig(BaseModel):
    """``engine: ray``: Ray Serve's own replicas, batching, autoscaling and back-pressure (ray.* keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    address: str | None = Field(None, description="Ray cluster to join ('auto' = the running one); null = start a local Ray")
    num_cpus: float | None = Field(None, gt=0, description="CPUs a local Ray may schedule (null = all usable cores)")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica (fractions allowed); ONNX Runtime gets max(1, round(this)) threads unless threads is set")
    min_replicas: int = Field(1, ge=0, description="autoscaling floor")
    max_replicas: int = Field(1, ge=1, description="autoscaling ceiling (= min_replicas: a fixed replica count)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests per replica the autoscaler aims for")
    upscale_delay_s: float = Field(30.0, ge=0, description="load must stay above target this long before a replica is added")
    downscale_delay_s: float = Field(600.0, ge=0, description="load must stay below target this long before a replica is removed")
    look_back_period_s: float = Field(30.0, gt=0, description="window over which the autoscaler averages the load")
    max_ongoing_requests: int = Field(8, ge=1, description="requests one replica handles at once (its batching window fills from these)")
    max_queued_requests: int = Field(256, ge=1, description="requests waiting for a replica; more get 503")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often replicas and proxies report their load to the autoscaler (Ray's *_AUTOSCALING_METRIC_PUSH_INTERVAL_S; local Ray only)")
    proxy: Literal["python", "haproxy"] = Field("python", description="Ray Serve's HTTP ingress: its Python proxy, or the HAProxy it bundles (RAY_SERVE_ENABLE_HA_PROXY; local Ray only); bench/ray_bench.py measures both")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    engine: Literal["embedded", "ray"] = Field("embedded", description="embedded = one process with edgeft's batcher; ray = Ray Serve replicas (pip install 'edgeft[ray]')")

    host: str = Field("127.0.0.1", description="address to bind; a non-loopback address needs keys or insecure_no_auth_public")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    keys: Path | None = Field(None, description="API key file (`edgeft keys add`); null = no access control")
    insecure_no_auth_public: bool = Field(False, description="allow a non-loopback host without keys (anyone can call it)")
    threads: int | None = Field(None, ge=1, le=1024, description="ONNX Runtime intra-op threads (null = usable cores)")
    ort_spinning: bool = Field(True, description="let ONNX Runtime's threads busy-wait between batches (off: they yield the cores to the HTTP thread)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="texts per inference batch (1 = no dynamic batching)")
    max_batch_tokens: int = Field(16384, ge=1, description="cap on batch rows x longest text, in tokens (padded cost)")
    max_queue_delay_ms: float = Field(2.0, ge=0, le=10_000, description="how long the worker may wait for batch-mates; it waits only while admitted requests are still on their way to the queue")
    queue_capacity: int = Field(256, ge=1, description="requests admitted at once (queued + computing); more get 503")
    request_timeout_s: float = Field(10.0, gt=0, description="deadline from admission to answer (text generation: to the start of generating); past it 503 (Triton: unavailable)")
    receive_timeout_s: float = Field(10.0, gt=0, description="deadline to receive a request's headers and body (slow clients get 408 / closed)")
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connection timeout")
    max_connections: int = Field(1024, ge=1, description="open connections + tasks; more get 503 from uvicorn")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body limit (413 above it)")
    max_items: int = Field(256, ge=1, description="texts per request (413 above it)")
    max_chars: int = Field(4096, ge=1, description="characters kept per text; longer texts are cut before tokenizing and marked truncated")
    max_length: int | None = Field(None, ge=2, description="tokens per text (null = the bundle's max_length)")
    generation_slots: int = Field(1, ge=1, le=64, description="text generation: generations computed at once (worker threads sharing one ONNX Runtime session); other admitted requests wait, and queue_capacity bounds both")
    max_new_tokens: int = Field(2048, ge=1, le=1_000_000, description="text generation: the largest max_tokens a request may ask for (400 above it); the model's context caps it too")
    default_max_tokens: int = Field(256, ge=1, le=1_000_000, description="text generation: max_tokens of a request that gives none (cut to max_new_tokens and to what the context leaves after the prompt)")
    rate_limit_rps: float = Field(0.0, ge=0, description="requests per second per API key (token bucket; 0 = off)")
    rate_limit_burst: int = Field(20, ge=1, description="token bucket size per API key")
    warmup_batches: int = Field(3, ge=0, le=100, description="warm-up batches before ready")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="SIGTERM: time to finish queued and in-flight requests")
    latency_budget_ms: float = Field(100.0, gt=0, description="request latency budget: a histogram bucket edge sits here")
    http: Literal["auto", "httptools", "h11"] = Field("auto", description="HTTP parser (as uvicorn's --http): auto = httptools where installed")
    loop: Literal["auto", "uvloop", "asyncio"] = Field("auto", description="event loop (as uvicorn's --loop): auto = uvloop where installed")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$", description="server log level")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray Serve settings (engine: ray); set one with --set ray.KEY=VALUE")

    @model_validator(mode="after")
    def _replicas(self) -> "ServeConfig":
        if self.ray.min_replicas > self.ray.max_replicas:
            raise ValueError(f"ray.min_replicas {self.ray.min_replicas} is above ray.max_replicas {self.ray.max_replicas}")
        return self

    def public_dict(self) -> dict[str, Any]:
        """The resolved config for logs and --print-config (no secrets: the key file is a path of digests)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dict(), sort_keys=False)


def _parse_set(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ServeConfigError(f"override '{text}' is not KEY=VALUE", "write it like --set max_batch_size=16")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ServeConfigError(f"override '{text}': value is not valid YAML", "quote the value") from None
    return key.strip(), value


def resolve_config(serving: dict[str, Any] | None = None, config_file: str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = (), flags: dict[str, Any] | None = None) -> ServeConfig:
    """Merge the layers (see the module docstring) and validate; raise ServeConfigError naming the field."""
    data: dict[str, Any] = {}
    # The manifest may hold fields a newer edgeft added: take only the ones this version knows.
    data.update({k: v for k, v in (serving or {}).items() if k in ServeConfig.model_fields})
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ServeConfigError(f"serve config {path} not found", "pass an existing YAML file") from None
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ServeConfigError(f"serve config {path} is not valid YAML", "fix its syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ServeConfigError(f"serve config {path} must be a YAML mapping", "write KEY: VALUE lines")
        data.update(loaded or {})
    for text in overrides:
        k, v = _parse_set(text)
        if "." in k:  # a nested section: ray.max_replicas=4
            head, tail = k.split(".", 1)
            section = data.get(head)
            data[head] = {**(section if isinstance(section, dict) else {}), tail: v}
        else:
            data[k] = v
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        raise ServeConfigError("invalid serve config: " + "; ".join(parts),
                               "see `edgeft serve --help` / the README ServeConfig table") from None


def config_reference() -> str:
    """Markdown table of every ServeConfig field (for the README)."""
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    fields = [(n, f) for n, f in ServeConfig.model_fields.items() if n != "ray"]
    fields += [(f"ray.{n}", f) for n, f in RayConfig.model_fields.items()]
    for name, f in fields:
        tname = str(f.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("pathlib.", "").replace(" | ", " or ")
        rows.append(f"| `{name}` | `{tname}` | `{f.get_default()!r}` | {f.description or ''} |")
    return "\n".join(rows) + "\n"
