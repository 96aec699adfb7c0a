"""Error types. Each carries the exit code the CLI returns and a fix hint.

The CLI prints ``error: <problem> (fix: <hint>)`` on one line and exits with
``exit_code``; no traceback for these.
"""

from __future__ import annotations


class EdgeftError(Exception):
    """Bad input or an unmet precondition: exit code 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem.rstrip(".")
        if self.fix:
            text += f" (fix: {self.fix.rstrip('.')})"
        return " ".join(text.split())  # one line, always


class RecipeError(EdgeftError):
    """The recipe file or an override is invalid."""


class DataError(EdgeftError):
    """The dataset cannot be read or is unusable."""


class ModelError(EdgeftError):
    """A model folder or file is missing, corrupt or unsupported."""


class RunDirError(EdgeftError):
    """The run folder exists or is not edgeft's."""


class GoalMissed(EdgeftError):
    """A stage finished but missed its goal (the best candidate is kept): exit code 1."""

    exit_code = 1


class Regression(EdgeftError):
    """The gate found a regression: exit code 1."""

    exit_code = 1
