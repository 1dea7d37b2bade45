"""Errors a user can cause.

The CLI catches :class:`UserError` at the top, prints its message as one line and exits
with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix: message is one line saying what is wrong and what to do."""

    exit_code = 2


class Interrupted(UserError):
    """Stopped by Ctrl-C (SIGINT): exit code 130 (128 + SIGINT); the message says what was
    kept. A UserError, so code that stops cleanly on a user error stops the same way."""

    exit_code = 130


class GateFailed(Exception):
    """A CI gate did not hold (exit code 1; the report is still written)."""

    exit_code = 1
