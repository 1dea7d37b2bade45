"""The rich consoles the CLI prints to: results on stdout, progress and notes on stderr."""

from rich.console import Console

out = Console()
err = Console(stderr=True)


def note(message: str) -> None:
    """A one-line notice for the user (an adaptation applied, a level cap...)."""
    err.print(f"[yellow]note:[/] {message}", highlight=False)
