"""Fetch named data sets into the data root before a job needs them (``ood-audit fetch``).

A set already readable under the root is left alone (nothing touches the network); a
missing one is downloaded by the set's own loader with ``download=True``, i.e.
torchvision's class, its mirrors and md5 checks, into torchvision's layout, where every
command then finds it. A failure is the loader's one-line
:class:`~ood_audit.errors.UserError`; for the MNIST family it names the URLs to fetch by
hand and the folder to put them in (:func:`.torchvision_sets.by_hand`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .registry import DATASETS, data_root, load_dataset


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_dataset` did for one set."""

    name: str
    status: str  # "present" (already readable), "downloaded", or "generated" (synthetic)
    root: Path


def fetch_dataset(name: str, root: Path | None = None, *, log=lambda message: None) -> Fetched:
    """Make every split of the named set readable under ``root`` (default: the data root),
    downloading it when it is missing. ``log`` hears one line before a download starts."""
    spec = DATASETS.get(name)
    if spec is None:
        raise UserError(f"unknown data set {name!r}; ood-audit fetch takes names: {', '.join(DATASETS)}")
    where = data_root(root)
    if spec.shape is None:  # synthetic sets are generated on demand
        return Fetched(name, "generated", where)
    try:
        for split in spec.splits:
            load_dataset(name, split, root=where, limit=1)
        return Fetched(name, "present", where)
    except UserError:
        pass  # missing (or damaged): let the download path say what is wrong, in one line
    log(f"{name}: downloading into {where} ...")
    for split in spec.splits:
        load_dataset(name, split, root=where, download=True, limit=1)
    return Fetched(name, "downloaded", where)
