"""The dequantization noise every score is computed on, per chunk of images.

Noise is drawn per chunk of :data:`NOISE_CHUNK` images from a generator seeded by
(seed, data set, chunk), so an image's x = (k + u) / 256, and hence its score, does not
depend on the batch size, on the number of DataLoader workers, or on how a set is
split across processes (:class:`Shard`). The scorer, its DataLoader
(:mod:`.loader`) and the second-order analysis all dequantize through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..data.preprocess import dequantize
from ..seeds import seeded

NOISE_CHUNK = 1024  # images dequantized together; fixes the noise independent of batching


@dataclass(frozen=True)
class Shard:
    """The noise chunks of every set one process scores: chunks rank, rank + world, ...

    Sharding on chunk boundaries keeps every image's noise (seeded by set and chunk)
    and hence every number independent of the number of processes.
    """

    rank: int = 0
    world: int = 1

    def chunks(self, n_images: int) -> list[tuple[int, int]]:
        """``(chunk number, first image)`` of this shard's chunks of an ``n_images`` set."""
        return [(c, start) for c, start in enumerate(range(0, n_images, NOISE_CHUNK))
                if c % self.world == self.rank]

    def size(self, n_images: int) -> int:
        return sum(min(NOISE_CHUNK, n_images - start) for _, start in self.chunks(n_images))


def dequantize_chunk(images: torch.Tensor, c: int, seed: int, key: int) -> torch.Tensor:
    """Noise chunk ``c`` of ``images`` (images ``c * NOISE_CHUNK ..``) dequantized with the
    generator ``seeded(seed, key, c)``: the one definition of the x every score is
    computed on (scorer, DataLoader, second-order analysis)."""
    start = c * NOISE_CHUNK
    return dequantize(images[start:start + NOISE_CHUNK], seeded(seed, key, c))


def dequantized_chunks(images: torch.Tensor, seed: int, key: int,
                       shard: Shard = Shard()) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first image, float chunk)`` of this shard's chunks of ``images``,
    dequantized with per-chunk seeded noise."""
    for c, start in shard.chunks(len(images)):
        yield start, dequantize_chunk(images, c, seed, key)
