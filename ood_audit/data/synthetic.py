"""Synthetic OOD sets that take the model's input shape.

- ``noise-uniform``: every pixel an integer uniform in 0..255;
- ``noise-gaussian``: every pixel round(N(127.5, 64^2)) clipped to 0..255;
- ``constant``: each image a single value drawn uniformly in 0..255.

Deterministic in (set, split, seed, shape): images are generated in fixed blocks, block
``b`` from ``numpy.random.SeedSequence([seed, split, set, b])``, so ``limit`` only
decides how many blocks to draw (cheap) and the first N images never depend on it.
Default sizes match the MNIST splits: 10000 test, 60000 train. Labels are -1.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import torch

from ..errors import UserError
from .images import ImageSet

DEFAULT_SIZES = {"test": 10_000, "train": 60_000}
BLOCK_ELEMENTS = 1 << 20  # pixels per generation block: bounds memory for any shape
_SPLIT_CODES = {"test": 0, "train": 1}

Generator = Callable[[np.random.Generator, tuple[int, int, int, int]], np.ndarray]


def _uniform(rng: np.random.Generator, size: tuple[int, int, int, int]) -> np.ndarray:
    return rng.integers(0, 256, size=size, dtype=np.uint8)


def _gaussian(rng: np.random.Generator, size: tuple[int, int, int, int]) -> np.ndarray:
    x = rng.standard_normal(size=size, dtype=np.float32) * np.float32(64.0) + np.float32(127.5)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _constant(rng: np.random.Generator, size: tuple[int, int, int, int]) -> np.ndarray:
    values = rng.integers(0, 256, size=size[0], dtype=np.uint8)
    return np.broadcast_to(values[:, None, None, None], size)


GENERATORS: dict[str, Generator] = {
    "noise-uniform": _uniform,
    "noise-gaussian": _gaussian,
    "constant": _constant,
}


def make_loader(name: str) -> Callable[..., ImageSet]:
    """The registry loader for synthetic set ``name`` (a key of :data:`GENERATORS`)."""

    def load(split: str, *, shape: tuple[int, int, int] | None = None,
             limit: int | None = None, seed: int = 0, **_: object) -> ImageSet:
        return generate(name, split, shape=shape, limit=limit, seed=seed)

    load.__doc__ = f"Synthetic set {name!r} in the model's shape."
    return load


#: The registry's loaders (:data:`ood_audit.data.registry.DATASETS`), one per set.
load_noise_uniform = make_loader("noise-uniform")
load_noise_gaussian = make_loader("noise-gaussian")
load_constant = make_loader("constant")


def generate(name: str, split: str, *, shape: tuple[int, int, int] | None,
             limit: int | None = None, seed: int = 0) -> ImageSet:
    """``uint8 [N, C, H, W]`` images of synthetic set ``name``; N = min(limit, default size)."""
    shape = _check_shape(name, shape)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{name}: seed must be a non-negative integer, got {seed!r}")
    n = DEFAULT_SIZES[split] if limit is None else min(limit, DEFAULT_SIZES[split])
    per_block = max(1, BLOCK_ELEMENTS // (shape[0] * shape[1] * shape[2]))
    out = torch.empty((n, *shape), dtype=torch.uint8)
    view = out.numpy()
    draw = GENERATORS[name]
    set_code = zlib.crc32(name.encode())
    for b, start in enumerate(range(0, n, per_block)):
        entropy = [seed, _SPLIT_CODES[split], set_code, b]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        block = draw(rng, (per_block, *shape))  # always a whole block: prefix-stable
        view[start:start + per_block] = block[: n - start]
    return ImageSet(name=name, split=split, images=out,
                    labels=torch.full((n,), -1, dtype=torch.int64))


def _check_shape(name: str, shape: object) -> tuple[int, int, int]:
    if shape is None:
        raise UserError(
            f"{name} has no shape of its own: it takes the model's input shape (C, H, W); "
            f"score it against a model, or pass shape=(C, H, W)"
        )
    try:
        c, h, w = (int(v) for v in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise UserError(f"{name}: shape must be three positive integers (C, H, W), "
                        f"got {shape!r}") from None
    if min(c, h, w) <= 0:
        raise UserError(f"{name}: shape must be three positive integers (C, H, W), got {shape!r}")
    return (c, h, w)
