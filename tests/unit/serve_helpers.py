"""Test helpers for the server: a tiny real bundle and a real server process on a free port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

LABELS = ["neg", "neu", "pos"]
REPO = Path(__file__).resolve().parents[2]


def make_bundle(folder: Path, *, name: str = "tiny", version: str = "1", serving: dict | None = None,
                schema: str = "edgeft.bundle/1", max_length: int = 64) -> Path:
    """A bundle as `edgeft ship` lays it out: tiny BERT exported to ONNX, tokenizer, labels, manifest, SHA256SUMS."""
    from conftest import make_tiny_classifier

    from edgeft.bundle import sums_text
    from edgeft.export import export_onnx

    work = folder.parent / f".{folder.name}-work"
    hf = make_tiny_classifier(work / "hf", num_labels=len(LABELS))
    onnx_dir = export_onnx(hf, work / "onnx").parent
    model = folder / "model"
    model.mkdir(parents=True)
    for p in onnx_dir.iterdir():
        if p.is_file():
            shutil.copyfile(p, model / p.name)
    (model / "labels.txt").write_text("\n".join(LABELS) + "\n")
    manifest = {"schema": schema, "name": name, "version": version, "task": "text-classification", "labels": LABELS,
                "tokenizer": {"max_length": max_length, "truncation": True}, "serving": serving or {}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (folder / "SHA256SUMS").write_text(sums_text(folder))
    shutil.rmtree(work)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(bundle: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "edgeft.cli", "serve", str(bundle), *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    return e


class Server:
    """`edgeft serve` in a subprocess; stderr (JSON log lines) goes to a file."""

    def __init__(self, bundle: Path, log_path: Path, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(serve_cmd(bundle, "--port", str(self.port), *args), env=env(),
                                     stdout=subprocess.DEVNULL, stderr=self._log)

    def wait_ready(self, timeout: float = 60) -> "Server":
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
