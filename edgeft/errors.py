"""Error types. Each carries the exit code the CLI returns and a fix hint.

The CLI prints ``error: <problem> (fix: <hint>)`` on one line and exits with
``exit_code``; no traceback for these. Exit codes: 0 ok, 1 goal missed / regression,
2 bad input or the machine's environment (:func:`from_os_error`: disk full, permission
denied, name too long), 3 an edgeft bug, 130 interrupted. Everything echoed goes through
:func:`printable`: no raw control characters from paths or names reach the terminal.
"""

from __future__ import annotations

import errno
import re
import unicodedata

# Characters a terminal may act on: C0 controls (ESC, CR, BS, ...), DEL, C1 controls (CSI 0x9b, ...),
# line/paragraph separators and the bidirectional overrides (U+202A-U+202E, U+2066-U+2069) that can
# reorder what is shown. Lone surrogates (undecodable bytes in file names) cannot be printed at all.
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C}


def _unsafe(ch: str) -> bool:
    c = ord(ch)
    return c < 0x20 or 0x7F <= c <= 0x9F or c in _BIDI or unicodedata.category(ch) in ("Zl", "Zp", "Cs")


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, *, keep_newlines: bool = False) -> str:
    r"""``text`` with every control character escaped, so that it can be echoed to a terminal:
    ESC ``[2K`` CR ``ok`` comes out as the text ``\x1b[2K\rok``, not as an escape sequence
    that rewrites the line. Plain spaces stay; ``\n`` is escaped too unless ``keep_newlines`` (for
    multi-line reports, whose lines are then escaped one by one)."""
    text = str(text)
    out = []
    for ch in text:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif _unsafe(ch):
            c = ord(ch)
            out.append(_SHORT.get(ch) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"))
        else:
            out.append(ch)
    return "".join(out)


class EdgeftError(Exception):
    """Bad input or an unmet precondition: exit code 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """Problem and fix on one line, safe to print: runs of spaces, tabs and newlines (edgeft's own
        line wrapping, multi-line library messages) become one space; every other control character
        (ESC, CR, C1, ...) is escaped by :func:`printable`, so a crafted path cannot rewrite the line."""
        text = str(self.problem).rstrip(".")
        if self.fix:
            text += f" (fix: {str(self.fix).rstrip('.')})"
        return printable(re.sub(r"[ \t\n]+", " ", text).strip())  # one line, always


class RecipeError(EdgeftError):
    """The recipe file or an override is invalid."""


class DataError(EdgeftError):
    """The dataset cannot be read or is unusable."""


class ModelError(EdgeftError):
    """A model folder or file is missing, corrupt or unsupported."""


class RunDirError(EdgeftError):
    """The run folder exists or is not edgeft's."""


class SystemProblem(EdgeftError):
    """The machine, not the input: disk full, permission denied, a path too long (exit code 2)."""


# errno -> (what happened, fix). Only conditions of the user's environment: anything else an OSError
# can mean (ENOENT on a file edgeft itself wrote, ...) stays an internal error.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space or pass --out on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space or pass --out on another disk"),
    errno.EFBIG: ("file too large for the file system", "pass --out on another file system"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter --out path: at most 255 bytes a name, 4096 a path"),
    errno.EACCES: ("permission denied", "check the permissions, or pass --out to a folder you can write"),
    errno.EPERM: ("operation not permitted", "check the permissions, or pass --out to a folder you can write"),
    errno.EROFS: ("read-only file system", "pass --out on a writable disk"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and retry"),
    errno.ENFILE: ("too many open files in the system", "close other programs and retry"),
    errno.EIO: ("input/output error (the disk or network file system failed)", "check the disk and retry"),
    errno.ELOOP: ("too many levels of symbolic links", "pass a path without symbolic-link loops"),
    errno.ENOMEM: ("out of memory", "lower the batch size or max_length"),
    errno.EADDRINUSE: ("address already in use", "pass another --port, or stop the server using it"),
}
_MESSAGES = {errno.ENOSPC: ("No space left on device", "os error 28"), errno.EDQUOT: ("Disk quota exceeded",)}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def from_os_error(exc: BaseException, where: object = None) -> SystemProblem | None:
    """A one-line :class:`SystemProblem` when ``exc`` (or an exception it was raised from) is an
    OSError of the user's environment, else None. Libraries that wrap the OSError in their own type
    (safetensors, torch's writer, protobuf) are recognised by the OS message in their text.
    ``where`` names the file or folder when the OSError does not (a failed ``write()`` has no name)."""
    code = name = None
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _OS_ERRORS:
            code, name = e.errno, e.filename
            break
    if code is None:
        text = " ".join(str(e) for e in _chain(exc))
        code = next((c for c, needles in _MESSAGES.items() if any(n in text for n in needles)), None)
        if code is None:
            return None
    what, fix = _OS_ERRORS[code]
    name = name if name is not None else where
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        place = f" while writing {name}" if name is not None else ""
    else:
        place = f": {name}" if name is not None else ""
    return SystemProblem(f"{what}{place}", fix)


class GoalMissed(EdgeftError):
    """A stage finished but missed its goal (the best candidate is kept): exit code 1."""

    exit_code = 1
