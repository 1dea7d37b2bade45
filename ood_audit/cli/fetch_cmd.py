"""``ood-audit fetch``: download named data sets into the data root when they are missing."""

from __future__ import annotations

from typing import Annotated

import typer

from . import render
from .options import DataRootOpt

NamesArg = Annotated[list[str], typer.Argument(help="Data set names, e.g. fashionmnist mnist.",
                                               show_default=False)]


def fetch(names: NamesArg, data_root: DataRootOpt = None) -> None:
    """Download data sets into the data root unless they are already there.

    Uses torchvision's downloaders (mirrors, md5 checks) and its folder layout, so every
    command then finds the sets. A set already present is not touched; synthetic sets
    need nothing. A failed download is one line naming the URLs to fetch by hand and the
    folder to put them in (exit 2). Example: ood-audit fetch fashionmnist mnist
    """
    from ..data.fetch import fetch_dataset  # torchvision: imported when the work starts

    for name in names:
        done = fetch_dataset(name, data_root, log=render.line)
        render.line(f"{name}: generated on demand, nothing to fetch" if done.status == "generated"
                    else f"{name}: {done.status} in {done.root}")
