"""The one registry of data sets, the data root, and ``load_dataset``.

:data:`DATASETS` is the single list of named sets; the CLI builds its choices and help
text from it. :func:`load_dataset` also takes a path to a ``.npy``/``.npz`` file or a
folder of images (see :mod:`ood_audit.data.user_files`). Registry names win over a
file or folder of the same name.

Every loader has the internal signature
``loader(split, *, root, download, limit, shape, seed) -> ImageSet`` and ignores the
arguments it has no use for. The named image sets and their files under the data root
are described in :mod:`.torchvision_sets` (MNIST family), :mod:`.array_sets` (CIFAR-10/100,
SVHN, ImageNet32) and :mod:`.image_file_sets` (CelebA, Omniglot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .files import ARRAY_SUFFIXES, IMAGE_SUFFIXES

if TYPE_CHECKING:
    from .images import ImageSet

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """One registered data set."""

    name: str
    summary: str  # one line, shown in --help
    shape: tuple[int, int, int] | None  # native (C, H, W); None: takes the model's shape
    splits: tuple[str, ...]
    #: ``module:function`` of this package, imported on first use, so the registry (and
    #: ``--help``, which lists it) loads without torch
    loader: str

    def load(self, split: str, **options: object) -> ImageSet:
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(split, **options)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("fashionmnist", "Fashion-MNIST clothing, 28x28 gray, 60k train / 10k test",
                    (1, 28, 28), SPLITS, "torchvision_sets:load_fashionmnist"),
        DatasetSpec("mnist", "MNIST handwritten digits, 28x28 gray, 60k train / 10k test",
                    (1, 28, 28), SPLITS, "torchvision_sets:load_mnist"),
        DatasetSpec("kmnist", "Kuzushiji-MNIST cursive Japanese characters, 28x28 gray, "
                    "60k train / 10k test", (1, 28, 28), SPLITS, "torchvision_sets:load_kmnist"),
        DatasetSpec("omniglot", "Omniglot handwritten characters, 105x105 resized to 28x28, "
                    "inverted to bright strokes, 19,280 background (train) / 13,180 "
                    "evaluation (test)", (1, 28, 28), SPLITS, "image_file_sets:load_omniglot"),
        DatasetSpec("cifar10", "CIFAR-10 objects, 32x32 RGB, 50k train / 10k test",
                    (3, 32, 32), SPLITS, "array_sets:load_cifar10"),
        DatasetSpec("cifar100", "CIFAR-100 objects (fine labels), 32x32 RGB, 50k train / "
                    "10k test", (3, 32, 32), SPLITS, "array_sets:load_cifar100"),
        DatasetSpec("svhn", "SVHN house-number digits, 32x32 RGB, 73,257 train / 26,032 test",
                    (3, 32, 32), SPLITS, "array_sets:load_svhn"),
        DatasetSpec("celeba", "CelebA faces, centre crop 140 resized to 32x32 RGB, 162,770 "
                    "train / 19,962 test", (3, 32, 32), SPLITS, "image_file_sets:load_celeba"),
        DatasetSpec("imagenet32", "downsampled ImageNet 32x32 RGB (npz batches), 1.28M train "
                    "/ 50k val as test", (3, 32, 32), SPLITS, "array_sets:load_imagenet32"),
        DatasetSpec("noise-uniform", "uniform noise: each pixel uniform in 0..255, model's shape",
                    None, SPLITS, "synthetic:load_noise_uniform"),
        DatasetSpec("noise-gaussian",
                    "Gaussian noise: pixels round(N(127.5, 64^2)) clipped to 0..255, "
                    "model's shape", None, SPLITS, "synthetic:load_noise_gaussian"),
        DatasetSpec("constant", "constant images: each one value uniform in 0..255, "
                    "model's shape", None, SPLITS, "synthetic:load_constant"),
    )
}


#: Image sets held in memory by the Python API (``ood_audit.audit`` on arrays), name ->
#: ImageSet, found by :func:`load_dataset` before the registry while
#: :func:`in_memory_sets` holds them; empty otherwise.
_IN_MEMORY: dict[str, ImageSet] = {}


@contextlib.contextmanager
def in_memory_sets(sets: dict[str, ImageSet]) -> Iterator[None]:
    """Let :func:`load_dataset` find ``sets`` by name for the duration of the block.

    Like a user's file, an in-memory set has no splits: ``train`` and ``test`` give the
    same images. A name of the registry, or one already held, is a UserError.
    """
    taken = [n for n in sets if n in DATASETS or n in _IN_MEMORY]
    if taken:
        raise UserError(f"{taken[0]!r} names a registered data set (or one already in use); "
                        "give your array another name")
    _IN_MEMORY.update(sets)
    try:
        yield
    finally:
        for name in sets:
            _IN_MEMORY.pop(name, None)


def data_root(explicit: Path | None = None) -> Path:
    """Where named data sets live: ``--data-root`` > ``$OOD_AUDIT_DATA`` > per-user cache.

    The cache is ``$XDG_CACHE_HOME/ood-audit/data``, else ``~/.cache/ood-audit/data``.
    Nothing is created here; ``--download`` creates folders as it needs them.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get("OOD_AUDIT_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "ood-audit" / "data"


def load_dataset(name_or_path: str, split: str = "test", *, root: Path | None = None,
                 download: bool = False, limit: int | None = None,
                 shape: tuple[int, int, int] | None = None, seed: int = 0) -> ImageSet:
    """Load a registered set by name, or the user's .npy/.npz file or image folder.

    ``limit`` keeps the first N images (N positive); ``shape`` (the model's (C, H, W)) is
    required by synthetic sets and ignored by the others (see ``adapt_to_shape``);
    ``seed`` drives synthetic sets only; ``download`` lets torchvision fetch a missing
    named set (all of them but ``imagenet32``, which needs an ImageNet account).
    """
    name = str(name_or_path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit <= 0):
        raise UserError(f"limit must be a positive number of images, got {limit!r}")
    held = _IN_MEMORY.get(name)
    if held is not None:
        _check_split(name, split, SPLITS)
        return dataclasses.replace(held if limit is None else held.head(limit), split=split)
    spec = DATASETS.get(name)
    if spec is None:
        if not name.strip():  # Path("") is the current folder: never read it by accident
            raise UserError(_unknown_message(name))
        if Path(name).expanduser().exists():
            _check_split(name, split, SPLITS)
            from .user_files import load_user_data  # torch: imported where loading starts

            return load_user_data(name, split, limit)
        raise UserError(_unknown_message(name))
    _check_split(name, split, spec.splits)
    return spec.load(split, root=data_root(root), download=download, limit=limit,
                     shape=shape, seed=seed)


def _check_split(name: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise UserError(f"unknown split {split!r} for {name}; choose one of {', '.join(splits)}")


def _unknown_message(name: str) -> str:
    names = ", ".join(DATASETS)
    looks_like_path = (os.sep in name or "/" in name
                       or Path(name).suffix.lower() in ARRAY_SUFFIXES + IMAGE_SUFFIXES)
    if looks_like_path:
        return (f"{name}: no such file or folder; pass a path to a .npy/.npz file or a folder "
                f"of images, or a data set name: {names}")
    return (f"unknown data set {name!r}; choose one of {names}, or pass a path to a .npy/.npz "
            f"file or a folder of images")
