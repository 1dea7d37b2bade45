"""``ood-audit fetch``: download named data sets into the data root when they are missing."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import DataRootOpt, path_or_none


def fetch(
    names: list[str] = typer.Argument(..., help="Data set names, e.g. fashionmnist mnist.",
                                      show_default=False),
    data_root: Path | None = DataRootOpt,
) -> None:
    """Download data sets into the data root unless they are already there.

    Uses torchvision's downloaders (mirrors, md5 checks) and its folder layout, so every
    command then finds the sets. A set already present is not touched; synthetic sets
    need nothing. A failed download is one line naming the URLs to fetch by hand and the
    folder to put them in (exit 2). Example: ood-audit fetch fashionmnist mnist
    """
    from ..data.fetch import fetch_dataset

    for name in names:
        done = fetch_dataset(name, path_or_none(data_root), log=typer.echo)
        if done.status == "generated":
            typer.echo(f"{name}: generated on demand, nothing to fetch")
        else:
            typer.echo(f"{name}: {done.status} in {done.root}")
