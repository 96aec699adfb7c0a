"""What this machine offers the runtimes: the CPU cores this process may use.

Kept free of heavy imports (torch, onnxruntime) so every module, the CLI included, can ask.
"""

from __future__ import annotations

import os

# Units of the numbers edgeft writes: every ``*_mb`` is megabytes of 10^6 bytes (model files, RSS,
# GPU memory alike; inputs that come in MiB, like nvidia-smi's and /proc's KiB, are converted), and
# every duration key ends in ``_s`` (seconds) or ``_ms``. MIB is only for converting such inputs.
MB = 10**6
MIB = 2**20


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a cgroup cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
