"""Progress bars (rich). Off when quiet; plain text lines when not a terminal."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from edgeft.errors import printable

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task, label: str, total: int, silent: bool = False):
        self.progress, self.task, self.label, self.total, self.silent = progress, task, label, total, silent
        self.done = 0
        self._last_print = 0.0

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        if self.progress is not None:
            self.progress.update(self.task, advance=n, info=_fmt(fields))
        elif not self.silent and fields and (time.monotonic() - self._last_print > 30 or self.done >= self.total):
            # Not a terminal (CI logs): a line every 30 s keeps the log short but alive.
            self._last_print = time.monotonic()
            print(f"  {self.label}: {self.done}/{self.total} {_fmt(fields)}", file=sys.stderr, flush=True)


def _fmt(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


@contextmanager
def bar(label: str, total: int, *, enabled: bool = True):
    if enabled and console.is_terminal:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                      console=console, transient=False) as progress:
            task = progress.add_task(label, total=total, info="")
            yield _Bar(progress, task, label, total)
    else:
        yield _Bar(None, None, label, total, silent=not enabled)


def say(message: str, *, enabled: bool = True) -> None:
    if enabled:  # model names and paths in messages are the user's: no raw control characters
        console.print(printable(message, keep_newlines=True), highlight=False)
