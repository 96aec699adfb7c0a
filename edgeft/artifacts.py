"""Atomic writes, run folders, checksums and the provenance manifest.

Every file edgeft writes goes through here: written to a temporary sibling,
fsynced, then renamed into place, so an interrupted run never leaves a
half-written file that looks complete. Folders are built under a temporary
name and renamed when whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeft.errors import RunDirError

RUN_MARKER = ".edgeft-run"  # only folders holding this file are ever deleted by --force


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only if the block succeeds.

    ``final`` must not exist (callers decide about overwriting before this).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_run_dir(run_dir: str | Path, *, force: bool = False) -> Path:
    """Create a fresh run folder. Refuse an existing one unless ``force``; with
    ``force`` only a folder edgeft made (it holds the marker) is replaced."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RunDirError(f"run folder {run_dir} exists and is not a folder", "choose another --out")
        if any(run_dir.iterdir()):
            if not force:
                raise RunDirError(
                    f"run folder {run_dir} already exists",
                    "choose another --out, or pass --force to replace an earlier edgeft run",
                )
            if not (run_dir / RUN_MARKER).exists():
                raise RunDirError(
                    f"run folder {run_dir} is not an edgeft run folder; refusing to delete it even with --force",
                    "choose another --out",
                )
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RUN_MARKER, "created by edgeft; --force may replace this folder\n")
    return run_dir


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_MARKER).exists()


def environment_fingerprint() -> dict[str, Any]:
    """Versions and hardware, without importing heavy libraries that are not loaded yet."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("edgeft", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
                "optimum", "optimum-onnx", "peft", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_info(),
        "versions": versions,
    }


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "amx_tile"]
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "flags": [f for f in wanted if f in flags],
        "has_vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "has_amx_int8": "amx_int8" in flags,
    }


def write_manifest(run_dir: str | Path, *, recipe_sha256: str | None = None, seed: int | None = None,
                   data: dict[str, Any] | None = None, stages: list[str] | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json``: versions, hardware, seed, data and recipe hashes, and
    the sha256 of every file in the run folder (the manifest itself excluded)."""
    run_dir = Path(run_dir)
    files = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_file() and p.name != "manifest.json" and not p.name.endswith(".tmp") and ".partial" not in str(p):
            files[str(p.relative_to(run_dir))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "schema": "edgeft.manifest/1",
        "created_unix": time.time(),
        "stages": stages or [],
        "seed": seed,
        "recipe_sha256": recipe_sha256,
        "data": data or {},
        "environment": environment_fingerprint(),
        "files": files,
        **(extra or {}),
    }
    return write_json_atomic(run_dir / "manifest.json", manifest)
