"""Prometheus metrics on their own registry. The names are a contract (alert rules use them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REJECTION_REASONS = ("queue_full", "rate_limited", "auth", "too_large", "invalid", "timeout")
# Text generation: why a generation ended (stop: eos or a stop string; length: max_tokens or the context;
# cancelled: the client left; error: the model failed).
FINISH_REASONS = ("stop", "length", "cancelled", "error")
TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def _time_buckets(budget_s: float) -> list[float]:
    base = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    return sorted(set(base + [round(budget_s, 6)]))


class Metrics:
    def __init__(self, *, latency_budget_s: float = 0.1, queue_capacity: int = 0, generation: bool = False):
        self.registry = r = CollectorRegistry()
        b = _time_buckets(latency_budget_s)
        self.requests = Counter("edgeft_requests", "Inference requests answered, by HTTP status", ["status"], registry=r)
        self.rejections = Counter("edgeft_rejections", "Requests refused before inference, by reason", ["reason"],
                                  registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.request_duration = Histogram("edgeft_request_duration_seconds", "Inference request time (admission to answer)",
                                          buckets=b, registry=r)
        self.queue_duration = Histogram("edgeft_queue_duration_seconds", "Time from admission to the first batch",
                                        buckets=b, registry=r)
        self.tokenize_duration = Histogram("edgeft_tokenize_duration_seconds", "Tokenize time per request",
                                           buckets=b, registry=r)
        self.compute_duration = Histogram("edgeft_compute_duration_seconds", "Model time per request (its batches)",
                                          buckets=b, registry=r)
        self.batch_size = Histogram("edgeft_batch_size", "Rows per inference batch (count = batches run)",
                                    buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256], registry=r)
        self.input_tokens = Histogram("edgeft_input_tokens", "Input tokens per text",
                                      buckets=[8, 16, 32, 64, 128, 256, 512, 1024], registry=r)
        self.pending = Gauge("edgeft_pending_requests", "Admitted inference requests not answered yet", registry=r)
        self.capacity = Gauge("edgeft_queue_capacity", "Admission limit (queue_capacity)", registry=r)
        self.capacity.set(queue_capacity)
        self.ready = Gauge("edgeft_model_ready", "1 when the model is warmed up and accepting work", registry=r)
        self.build_info = Gauge("edgeft_build_info", "edgeft version and the served bundle",
                                ["version", "bundle_digest", "model"], registry=r)
        self.auth_failures = Counter("edgeft_auth_failures", "Requests with a missing, malformed or wrong key",
                                     registry=r)
        if generation:  # a text-generation bundle's server (edgeft.serve.generation)
            self.generated_tokens = Counter("edgeft_generated_tokens", "Tokens generated (an ending eos included)",
                                            registry=r)
            self.prompt_tokens = Counter("edgeft_prompt_tokens", "Prompt tokens of the generations started",
                                         registry=r)
            self.time_to_first_token = Histogram("edgeft_time_to_first_token_seconds",
                                                 "Admission to the first generated token (queue + prompt)",
                                                 buckets=TTFT_BUCKETS_S, registry=r)
            self.generations = Counter("edgeft_generation_requests", "Generations ended, by finish reason",
                                       ["finish_reason"], registry=r)
            for reason in FINISH_REASONS:
                self.generations.labels(reason)

    def observe_batch(self, rows: int, tokens: list[int]) -> None:
        """Engines call this once per computed batch (from any thread)."""
        self.batch_size.observe(rows)
        for t in tokens:
            self.input_tokens.observe(t)

    def render(self) -> bytes:
        return generate_latest(self.registry)
