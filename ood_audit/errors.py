"""Errors a user can cause.

The CLI catches :class:`UserError` at the top, prints its message as one line and exits
with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input the user can fix: message is one line saying what is wrong and what to do."""

    exit_code = 2


class Interrupted(UserError):
    """Stopped by a signal: Ctrl-C (SIGINT, exit code 130) or SIGTERM (a scheduler or
    ``kill``: 143), 128 + the signal number as shells report it; the message says what was
    kept. A UserError, so code that stops cleanly on a user error stops the same way."""

    exit_code = 130

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGINT))


class SaidByRankZero(UserError):
    """A user error every torchrun rank meets alike (a bad option, an existing run): rank 0
    prints it, the others exit with its code silently, so the user reads it once."""


class GateFailed(Exception):
    """A CI gate did not hold (exit code 1; the report is still written)."""

    exit_code = 1
