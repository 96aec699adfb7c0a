"""API keys: bearer tokens stored only as SHA-256 digests, compared in constant time.

Key file: one key per line, ``ID:SHA256HEX`` (``#`` comments and blank lines allowed).
``edgeft keys add FILE --id NAME`` prints a new key once and stores only its digest.
Logs and metrics name the key id, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

from edgeft.errors import EdgeftError

KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_LINE_RE = re.compile(r"^([A-Za-z0-9_.-]{1,64}):([0-9a-f]{64})$")
# A bearer token as RFC 6750 allows it (b64token), bounded in length.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-._~+/]{1,512}=*$")


class KeyFileError(EdgeftError):
    """The key file is missing or malformed: exit code 2."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_keys(path: str | Path) -> dict[str, str]:
    """Key id -> sha256 hex digest; raise KeyFileError naming the bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found", f"create one with: edgeft keys add {path} --id NAME") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"key file {path} cannot be read ({type(e).__name__})", "check the path") from None
    keys: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if not m:
            raise KeyFileError(f"key file {path} line {n} is not ID:SHA256HEX", "write keys with edgeft keys add")
        if m.group(1) in keys:
            raise KeyFileError(f"key file {path} line {n}: duplicate key id {m.group(1)!r}", "give every key its own id")
        keys[m.group(1)] = m.group(2)
    return keys


def add_key(path: str | Path, key_id: str | None = None) -> tuple[str, str]:
    """Create a key, append its digest to ``path`` (atomic replace, mode 0600); return (id, key)."""
    path = Path(path)
    keys = read_keys(path) if path.exists() else {}
    key_id = key_id or f"key{len(keys) + 1}"
    if not KEY_ID_RE.match(key_id):
        raise KeyFileError(f"key id {key_id!r} is not allowed", "use 1-64 letters, digits, '_', '.', '-'")
    if key_id in keys:
        raise KeyFileError(f"key id {key_id!r} already exists in {path}", "pick another --id (or delete its line to revoke it)")
    key = "eft_" + secrets.token_urlsafe(32)
    keys[key_id] = digest(key)
    text = "".join(f"{k}:{v}\n" for k, v in keys.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return key_id, key


class AuthResult:
    __slots__ = ("key_id", "error")

    def __init__(self, key_id: str | None = None, error: str | None = None):
        self.key_id, self.error = key_id, error


class KeyStore:
    """The loaded digests; ``reload()`` swaps them atomically (SIGHUP)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._digests: list[tuple[str, bytes]] = []
        self.reload()

    def reload(self) -> int:
        keys = read_keys(self.path)
        self._digests = [(k, bytes.fromhex(v)) for k, v in keys.items()]
        return len(self._digests)

    def check(self, authorization: str | None) -> AuthResult:
        if not authorization:
            return AuthResult(error="missing")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not _TOKEN_RE.match(token):
            return AuthResult(error="malformed")
        d = hashlib.sha256(token.encode("ascii")).digest()
        found = None
        for key_id, ref in self._digests:  # no early exit: every digest is compared
            if hmac.compare_digest(d, ref) and found is None:
                found = key_id
        return AuthResult(key_id=found) if found else AuthResult(error="invalid")


class RateLimiter:
    """Token bucket per key id: ``rate`` requests/s, ``burst`` at most. ``rate == 0`` disables it."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key_id: str) -> float:
        """0 when allowed, else the seconds until a token is free."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key_id] = (tokens - 1, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / self.rate
