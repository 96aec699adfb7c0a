"""What every bench/results file records about how it was made: the command line, the git commit (and
whether the working tree had changes), the CPU (model, int8 flags), library versions, the load average,
and the sha256 of each compress report measured. Shared by the scripts in bench/ (not a package: they
import it as a sibling module)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str, strip: bool = True) -> str | None:
    try:  # --no-optional-locks: reading the status must not write the index
        p = subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (p.stdout.strip() if strip else p.stdout) if p.returncode == 0 else None


def git_state() -> dict:
    """``git_commit`` (HEAD), ``git_dirty`` (tracked files changed) and ``git_changed`` (changed or untracked
    paths, at most 50: e.g. the measuring script itself when it is not committed yet)."""
    tracked = _git("status", "--porcelain", "--untracked-files=no")
    everything = _git("status", "--porcelain", strip=False) or ""  # "XY path": keep the leading blank
    changed = [line[3:] for line in everything.splitlines() if line.strip()]
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(tracked), "git_changed": changed[:50]}


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as it was typed (``argv`` None: this process's own ``sys.argv``)."""
    if argv is None:
        return shlex.join([Path(sys.executable).name, *sys.argv])
    return shlex.join(["python", script, *argv])


def versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def provenance(script: str, argv: list[str] | None, packages: tuple[str, ...] = ("onnxruntime", "onnx", "numpy")) -> dict:
    """The fields every result file carries (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    from edgeft.artifacts import cpu_info

    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(script, argv), **git_state(),
            "cpu": cpu_info(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions(*packages),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def compress_report(path: str | Path) -> dict:
    """Path, sha256 and verdict of one ``compress/report.json`` (what a measured model was made with)."""
    import json

    sys.path.insert(0, str(ROOT))
    from edgeft.artifacts import sha256_file

    path = Path(path)
    entry: dict = {"path": str(path), "sha256": sha256_file(path) if path.is_file() else None}
    if path.is_file():
        try:
            rep = json.loads(path.read_text())
        except ValueError:
            rep = {}
        if isinstance(rep, dict):
            entry["bytes"] = path.stat().st_size
            entry["goal_met"] = rep.get("goal_met")
            entry["verdict"] = rep.get("verdict")
    return entry


def markdown_header(doc: dict, machine: bool = True) -> list[str]:
    """The provenance lines of a result file's markdown (``machine``: with the CPU, versions, load)."""
    lines = [f"- command: `{doc['command']}`",
             f"- git commit: `{doc['git_commit']}`" + (" (working tree had changes)" if doc["git_dirty"] else "")]
    if machine:
        cpu = doc["cpu"]
        lines += [f"- CPU: {cpu['model']}, usable cores {cpu['usable_cores']}, int8-relevant flags: "
                  f"{', '.join(cpu['flags']) or 'none'} (VNNI: {cpu['has_vnni']}, AMX int8: {cpu['has_amx_int8']})",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v),
                  f"- load average at start: {doc['loadavg_start']}"]
    if doc.get("git_changed"):
        lines.append("- uncommitted paths: " + ", ".join(f"`{p}`" for p in doc["git_changed"][:10])
                     + (" ..." if len(doc["git_changed"]) > 10 else ""))
    for r in doc.get("compress_reports") or []:
        lines.append(f"- compress report: `{r['path']}` sha256 `{r['sha256']}`")
    return lines


def write_result(doc: dict, out_dir: Path, stem: str, markdown: str) -> Path:
    """``out_dir/stem.json`` and ``.md``, atomically; returns the json path."""
    sys.path.insert(0, str(ROOT))
    from edgeft.artifacts import write_json_atomic, write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "loadavg_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    out = write_json_atomic(out_dir / f"{stem}.json", doc)
    write_text_atomic(out_dir / f"{stem}.md", markdown)
    return Path(out)
