"""The one user-facing error type: bad input that the user can fix.

Every module raises :class:`UserError` for input a user gave (recipe, data file, manifest,
checkpoint, CLI flag). The CLI prints it as one line and exits 2; nothing else is caught, so a bug
still shows its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: ``message`` says what is wrong, ``hint`` how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ResultNotWritten(UserError):
    """Training finished but its last checkpoint or ``final/`` could not be written; what was written
    is kept and the message says how to get the model from it (exit 1)."""

    exit_code = 1


class AuditFailed(UserError):
    """The data audit found problems at the failing severity: the run must not start (exit 1)."""

    exit_code = 1
