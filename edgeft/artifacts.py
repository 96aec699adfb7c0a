"""Atomic writes, run folders, checksums and the provenance manifest.

Every file edgeft writes goes through here: written to a temporary sibling,
fsynced, then renamed into place, so an interrupted run never leaves a
half-written file that looks complete. Folders are built under a temporary
name (a hidden ``.NAME.*.partial`` sibling, flocked while it is being built) and
swapped in when whole; the old folder stays until then. A run folder is written
by one process at a time: :func:`open_run_dir` holds an flock on its lock file for
the whole command (the OS releases it on exit or crash) and removes partial
folders that a killed run left behind. Names come from :mod:`edgeft.layout`.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from edgeft.hardware import usable_cores
from edgeft.layout import LOCK_NAME, MANIFEST, MANIFEST_SCHEMA, RUN_MARKER, RunLayout

__all__ = ["RUN_MARKER", "atomic_dir", "open_run_dir", "prepare_run_dir", "run_lock", "write_manifest"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~_umask()


def _share_modes(folder: Path) -> None:
    """Give every file and folder under ``folder`` the umask's mode: libraries that write through
    mkstemp (safetensors does) leave 0600 files among 0644 ones."""
    fmode, dmode = _file_mode(), 0o777 & ~_umask()
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        with contextlib.suppress(OSError):
            os.chmod(p, dmode if p.is_dir() else fmode)


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
        os.fchmod(fd, _file_mode())  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write()/fsync() names no file; the error line should (disk full)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _test_pause(name: str) -> None:
    """Test hook: with EDGEFT_TEST_PAUSE_IN=NAME, building the folder NAME signals readiness by creating
    EDGEFT_TEST_PAUSE_FILE and then sleeps (so tests can signal a run that is mid-work). Off otherwise."""
    if os.environ.get("EDGEFT_TEST_PAUSE_IN") != name:
        return
    if flag := os.environ.get("EDGEFT_TEST_PAUSE_FILE"):
        Path(flag).write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("EDGEFT_TEST_PAUSE_S", "60")))


@contextlib.contextmanager
def partial_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A hidden ``parent/.NAME.*.partial`` folder, flocked while the block runs (so a later run can tell a
    stale one, left by a killed process, from one being built) and removed when the block ends (whatever
    the block moved out of it stays)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def replace_dir(src: Path, dst: Path) -> None:
    """Put the complete folder ``src`` at ``dst``; an old ``dst`` is moved aside first and deleted only
    after the new one is in place (a crash in between leaves a stale ``.partial`` that is cleaned later)."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.is_symlink():
        raise RunDirError(f"{dst} is a symbolic link; edgeft does not replace or write through links",
                          "remove the link or choose another output folder")
    if dst.exists():
        old = dst.with_name(f".{dst.name}.{os.getpid()}-{time.time_ns()}.old.partial")
        os.rename(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; put it at ``final`` only if the block succeeds.

    An existing ``final`` (callers decide about overwriting before this) stays until the new one is whole.
    """
    final = Path(final)
    with partial_dir(final.parent, final.name) as tmp:
        _test_pause(final.name)
        yield tmp
        _share_modes(tmp)
        replace_dir(tmp, final)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# realpath of a folder this process holds the lock of -> [fd, depth]; the lock is re-entrant in-process
_HELD: dict[str, list[int]] = {}


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = lock.read_text(encoding="utf-8").split()
        if text:
            return text[0]
    return "unknown"


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive flock on ``folder/.edgeft.lock`` for the block (creating the folder). Another
    process holding it -> RunDirError naming its pid. The OS drops the lock when the process dies."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _file_mode())
    except OSError as e:
        raise RunDirError(f"cannot open the lock file {lock} ({e.strerror})",
                          "choose an --out folder you can write, that is not a link") from None
    if not _try_flock(fd):
        os.close(fd)
        raise RunDirError(f"{folder} is in use by another edgeft process (pid {_holder(lock)}); "
                          "refusing to write into it or replace it",
                          "wait for that run to finish or stop it, or choose another --out")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = [fd, 1]
        yield folder
    finally:
        _HELD.pop(key, None)
        os.close(fd)


def _tree_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def clean_stale_partials(folder: str | Path, *, say: bool = True) -> list[str]:
    """Remove the hidden ``.*.partial`` folders in ``folder`` that no process is building (their flock is
    free: a killed run left them); say so in one line. Returns the names removed."""
    folder = Path(folder)
    removed, freed = [], 0
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if not (p.name.startswith(".") and p.name.endswith(".partial")) or p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not _try_flock(fd):
                continue  # being built right now
            size = _tree_bytes(p)
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p.name)
                freed += size
        finally:
            os.close(fd)
    if removed and say:
        print(f"note: removed {len(removed)} stale partial folder(s) left by an interrupted run in {folder}: "
              f"{', '.join(removed)} ({freed / 2**20:.1f} MiB)", file=sys.stderr, flush=True)
    return removed


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise RunDirError(f"{path} is a symbolic link; edgeft does not write, replace or delete through links",
                          f"pass the real folder ({os.path.realpath(path)}) or another --out")


def _empty_run_dir(run_dir: Path) -> None:
    """Delete an earlier run's files, keeping the lock file (it is held: a new lock file would be a new lock)."""
    for p in run_dir.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def open_run_dir(run_dir: str | Path, *, force: bool = False, mode: str = "fresh") -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block, after removing stale partial folders in it.

    - ``mode="fresh"``: a new run folder. An existing non-empty one is refused unless ``force``, and with
      ``force`` only a folder edgeft made (it holds the marker) is emptied and reused;
    - ``mode="update"``: an existing edgeft run folder, written in place (``compress RUN``);
    - ``mode="output"``: a folder edgeft made (marker or edgeft manifest), or a new or empty one
      (``bench --out``); never a folder of the user's own.
    A symbolic link is always refused. A folder this call created is removed again when the block fails
    before anything but the marker was written.
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    _refuse_link(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} exists and is not a folder", "choose another --out")
    created = not run_dir.exists()
    nonempty = not created and any(p.name != LOCK_NAME for p in run_dir.iterdir())
    if mode == "fresh" and nonempty and not layout.is_run():
        if not force:
            raise RunDirError(f"run folder {run_dir} already exists",
                              "choose another --out, or pass --force to replace an earlier edgeft run")
        raise RunDirError(f"run folder {run_dir} is not an edgeft run folder; refusing to delete it even with --force",
                          "choose another --out")
    if mode == "update" and not layout.is_run():
        raise RunDirError(f"{run_dir} is not an edgeft run folder", "pass a folder written by 'edgeft run'")
    if mode == "output" and nonempty and not layout.is_edgeft_folder():
        raise RunDirError(f"{run_dir} is not empty and edgeft did not make it (no {RUN_MARKER}, no edgeft "
                          f"{MANIFEST}); refusing to write into it", "pass --out with a new or empty folder")
    with run_lock(run_dir):
        try:
            clean_stale_partials(run_dir)
            if mode == "fresh":
                if nonempty:
                    if not force:
                        raise RunDirError(f"run folder {run_dir} already exists",
                                          "choose another --out, or pass --force to replace an earlier edgeft run")
                    _empty_run_dir(run_dir)
                write_text_atomic(layout.marker, "created by edgeft; --force may replace this folder\n")
            yield run_dir
        except BaseException:
            if created and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK_NAME, RUN_MARKER}:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def prepare_run_dir(run_dir: str | Path, *, force: bool = False) -> Path:
    """Create a fresh run folder (see :func:`open_run_dir`; the lock is released on return)."""
    with open_run_dir(run_dir, force=force) as path:
        return path


def is_run_dir(path: str | Path) -> bool:
    return RunLayout(Path(path)).is_run()


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
        "usable_cores": usable_cores(),
        "flags": [f for f in wanted if f in flags],
        "has_vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "has_amx_int8": "amx_int8" in flags,
    }


def manifest_files(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the run folder but the manifest, the lock and work files."""
    run_dir = Path(run_dir)
    files = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if rel.as_posix() in (MANIFEST, LOCK_NAME) or p.name.endswith(".tmp") or p.is_symlink() or not p.is_file():
            continue
        if any(part.endswith(".partial") for part in rel.parts):
            continue
        files[rel.as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def write_manifest(run_dir: str | Path, *, recipe_sha256: str | None = None, seed: int | None = None,
                   data: dict[str, Any] | None = None, stages: list[str] | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json``: versions, hardware, seed, data and recipe hashes, and
    the sha256 of every file in the run folder (the manifest itself excluded)."""
    run_dir = Path(run_dir)
    files = manifest_files(run_dir)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "created_unix": time.time(),
        "stages": stages or [],
        "seed": seed,
        "recipe_sha256": recipe_sha256,
        "data": data or {},
        "environment": environment_fingerprint(),
        "files": files,
        **(extra or {}),
    }
    return write_json_atomic(run_dir / MANIFEST, manifest)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run folder's edgeft manifest, or {} when there is none (or it is not edgeft's)."""
    try:
        data = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and str(data.get("schema", "")).startswith("edgeft.manifest/") else {}


def update_manifest(run_dir: str | Path, **fields: Any) -> Path:
    """Re-hash every file of the run folder into its manifest, keeping what the manifest recorded and
    setting ``fields`` (a stage that wrote into an existing run folder calls this)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) or {"schema": MANIFEST_SCHEMA, "created_unix": time.time(),
                                          "environment": environment_fingerprint()}
    manifest.update(fields)
    manifest["updated_unix"] = time.time()
    manifest["files"] = manifest_files(run_dir)
    return write_json_atomic(run_dir / MANIFEST, manifest)
