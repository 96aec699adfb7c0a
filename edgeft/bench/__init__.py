"""Benchmark: latency (engine-only and end-to-end), throughput, accuracy, memory, size and load time of
models on every runtime present, measured interleaved in one process. See ``edgeft.bench.core``."""

from __future__ import annotations

from edgeft.bench.core import SCHEMA, bench_models, bench_paths

__all__ = ["SCHEMA", "bench_models", "bench_paths"]
