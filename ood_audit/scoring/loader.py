"""Dequantized batches from a DataLoader with workers and pinned memory (GPU scoring).

On a GPU the forward pass can outrun the CPU work of dequantizing the next batch; this
moves that work to worker processes and the host-to-device copy off the critical path
(pinned memory, ``non_blocking``). The images are *the same* as the scorer's in-process
:func:`~ood_audit.scoring.scorer.dequantized_chunks`: the unit of work is one noise chunk
(:func:`~ood_audit.scoring.scorer.dequantize_chunk`), so a score
never depends on the number of workers, the batch size or the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .scorer import dequantize_chunk


class DequantizedChunks(Dataset):
    """Item ``i``: the noise chunk ``c`` of ``(c, first) = chunks[i]``, dequantized as the
    scorer does (:func:`~ood_audit.scoring.scorer.dequantize_chunk`), float ``[n, C, H, W]``."""

    def __init__(self, images: torch.Tensor, chunks: list[tuple[int, int]], seed: int, key: int):
        self.images, self.chunks, self.seed, self.key = images, chunks, seed, key

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return dequantize_chunk(self.images, self.chunks[i][0], self.seed, self.key)


def dequantized_batches(images: torch.Tensor, chunks: list[tuple[int, int]], *, batch_size: int,
                        seed: int, key: int, device: torch.device, workers: int = 2
                        ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(c, start, x)``: ``x`` = images ``start .. start + len(x) - 1`` of noise
    chunk ``c``, dequantized exactly as the scorer does, on ``device``. ``chunks`` lists
    ``(chunk number, first image)`` pairs (the scorer's ``shard.chunks(len(images))``);
    batches never straddle a chunk, as in the scorer. ``workers = 0`` dequantizes in this
    process; memory is pinned only when ``device`` is CUDA.

    Wiring into ``score_images`` (scorer.py), replacing its chunk loop and batch slices::

        for c, start, x in dequantized_batches(job.images.images, shard.chunks(n),
                batch_size=batch_size, seed=seed, key=job.key,
                device=device, workers=2 if device.type == "cuda" else 0):
            # seed the global RNG once per new chunk c, as now; idx = arange(start, start + len(x))
    """
    pin = device.type == "cuda"
    loader = DataLoader(DequantizedChunks(images, chunks, seed, key), batch_size=None,
                        num_workers=workers, pin_memory=pin,
                        prefetch_factor=2 if workers else None)
    for (c, first), block in zip(chunks, loader, strict=True):
        for b in range(0, len(block), batch_size):
            yield c, first + b, block[b:b + batch_size].to(device, non_blocking=pin)
