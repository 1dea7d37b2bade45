"""Dequantized batches from a DataLoader with workers and pinned memory (GPU scoring).

On a GPU the forward pass can outrun the CPU work of dequantizing the next batch; this
moves that work to worker processes and the host-to-device copy off the critical path
(pinned memory, ``non_blocking``). The images are *the same* as the scorer's in-process
:func:`~ood_audit.scoring.scorer.dequantized_chunks`: the unit of work is one noise chunk
(``chunk`` images dequantized with the generator ``seeded(seed, key, c)``), so a score
never depends on the number of workers, the batch size or the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import dequantize
from ..training.trainer import seeded


class DequantizedChunks(Dataset):
    """Item ``i``: the noise chunk ``(c, first) = chunks[i]``, i.e. images
    ``first .. first + chunk - 1`` dequantized with ``seeded(seed, key, c)``, float
    ``[n, C, H, W]``."""

    def __init__(self, images: torch.Tensor, chunks: list[tuple[int, int]], chunk: int,
                 seed: int, key: int):
        self.images, self.chunks, self.chunk, self.seed, self.key = images, chunks, chunk, seed, key

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        c, first = self.chunks[i]
        return dequantize(self.images[first:first + self.chunk], seeded(self.seed, self.key, c))


def dequantized_batches(images: torch.Tensor, chunks: list[tuple[int, int]], *, batch_size: int,
                        chunk: int, seed: int, key: int, device: torch.device, workers: int = 2
                        ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(c, start, x)``: ``x`` = images ``start .. start + len(x) - 1`` of noise
    chunk ``c``, dequantized exactly as the scorer does, on ``device``. ``chunks`` lists
    ``(chunk number, first image)`` pairs (the scorer's ``shard.chunks(len(images))``);
    batches never straddle a chunk, as in the scorer. ``workers = 0`` dequantizes in this
    process; memory is pinned only when ``device`` is CUDA.

    Wiring into ``score_images`` (scorer.py), replacing its chunk loop and batch slices::

        for c, start, x in dequantized_batches(job.images.images, shard.chunks(n),
                batch_size=batch_size, chunk=NOISE_CHUNK, seed=seed, key=job.key,
                device=device, workers=2 if device.type == "cuda" else 0):
            # seed the global RNG once per new chunk c, as now; idx = arange(start, start + len(x))
    """
    pin = device.type == "cuda"
    loader = DataLoader(DequantizedChunks(images, chunks, chunk, seed, key), batch_size=None,
                        num_workers=workers, pin_memory=pin,
                        prefetch_factor=2 if workers else None)
    for (c, first), block in zip(chunks, loader, strict=True):
        for b in range(0, len(block), batch_size):
            yield c, first + b, block[b:b + batch_size].to(device, non_blocking=pin)
