"""The rich consoles the CLI prints to: results on stdout, progress and notes on stderr."""

import os
import sys

from rich.console import Console


def _width(stream) -> int | None:
    """Rich's own width on a terminal; a wide fixed width in logs and pipes (CI), so
    tables of long data-set paths are not folded into unreadable columns."""
    if stream.isatty() or os.environ.get("COLUMNS"):
        return None
    return 160


out = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))


def note(message: str) -> None:
    """A one-line notice for the user (an adaptation applied, a level cap...)."""
    err.print(f"[yellow]note:[/] {message}", highlight=False)
