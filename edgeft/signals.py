"""SIGTERM handled like Ctrl-C: what CI cancellation and `timeout` send must clean up like an interrupt.

:func:`install` makes SIGTERM raise :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread, so
every ``except BaseException`` cleanup (partial folders, temp files) runs, the run's manifest records
the interruption, and the CLI exits 143 (SIGINT: 130). A second SIGTERM during that cleanup is ignored.
``edgeft serve`` installs its own handler (drain, exit 0) on top of this one.
"""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM."""

    signal_name = "SIGTERM"
    exit_code = 128 + signal.SIGTERM


_fired = False


def _on_sigterm(signum, frame) -> None:
    global _fired
    if _fired:  # already unwinding: let the cleanup finish
        return
    _fired = True
    raise Terminated()


def install() -> None:
    """Handle SIGTERM like Ctrl-C (main thread only; elsewhere nothing changes)."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. an embedding application)
        pass


def signal_name(exc: BaseException) -> str:
    return getattr(exc, "signal_name", "SIGINT")
