"""Dequantized batches from a DataLoader with workers and pinned memory (GPU scoring).

On a GPU the forward pass can outrun the CPU work of dequantizing the next batch; this
moves that work to worker processes and the host-to-device copy off the critical path
(pinned memory, ``non_blocking``). The images are *the same* as the scorer's in-process
:func:`~ood_audit.scoring.noise.dequantized_chunks`: the unit of work is one noise chunk
(:func:`~ood_audit.scoring.noise.dequantize_chunk`), so a score
never depends on the number of workers, the batch size or the device.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..interrupts import sigint_deferred
from .noise import dequantize_chunk


def default_workers(device: torch.device) -> int:
    """2 on CUDA (dequantizing overlaps the GPU's forward pass); 0 on CPU, where worker
    processes would take cores from the forward pass itself."""
    return 2 if device.type == "cuda" else 0


def check_workers(workers: int | None) -> None:
    """UserError for a negative worker count (None: the device's default)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 0):
        raise UserError(f"--workers must be 0 (dequantize in the scoring process) or a "
                        f"positive number of worker processes, got {workers!r}")


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: let the main process alone handle it (and
    # shut the workers down), instead of racing it with "worker exited unexpectedly".
    # (Until then they hold the parent's recording handler: see dequantized_batches.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DequantizedChunks(Dataset):
    """Item ``i``: the noise chunk ``c`` of ``(c, first) = chunks[i]``, dequantized as the
    scorer does (:func:`~ood_audit.scoring.noise.dequantize_chunk`), float ``[n, C, H, W]``."""

    def __init__(self, images: torch.Tensor, chunks: list[tuple[int, int]], seed: int, key: int):
        self.images, self.chunks, self.seed, self.key = images, chunks, seed, key

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return dequantize_chunk(self.images, self.chunks[i][0], self.seed, self.key)


def dequantized_batches(images: torch.Tensor, chunks: list[tuple[int, int]], *, batch_size: int,
                        seed: int, key: int, device: torch.device, workers: int | None = None
                        ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(c, start, x)``: ``x`` = images ``start .. start + len(x) - 1`` of noise
    chunk ``c``, dequantized exactly as the scorer does, on ``device``. ``chunks`` lists
    ``(chunk number, first image)`` pairs (the scorer's ``shard.chunks(len(images))``);
    batches never straddle a chunk. ``workers = 0`` dequantizes in this process, None
    takes :func:`default_workers`; memory is pinned only when ``device`` is CUDA.

    At most ``2 * workers`` chunks (1,024 images each) wait in flight, so memory does not
    grow with the set.
    """
    check_workers(workers)
    workers = default_workers(device) if workers is None else workers
    workers = min(workers, len(chunks))  # no idle processes for a small set
    pin = device.type == "cuda"
    loader = DataLoader(DequantizedChunks(images, chunks, seed, key), batch_size=None,
                        num_workers=workers, pin_memory=pin,
                        prefetch_factor=2 if workers else None,
                        worker_init_fn=_ignore_sigint if workers else None,
                        # its own generator: creating the iterator never draws from the
                        # global RNG, which a VAE's IWAE bound samples from (seeded per chunk)
                        generator=torch.Generator())
    # Workers are forked here. With SIGINT held back meanwhile, a Ctrl-C can neither hit a
    # worker before it ignores SIGINT nor be swallowed by an at-fork hook in this process
    # (both seen); this process gets it right after.
    with sigint_deferred():
        blocks = iter(loader)
    for (c, first), block in zip(chunks, blocks, strict=True):
        for b in range(0, len(block), batch_size):
            yield c, first + b, block[b:b + batch_size].to(device, non_blocking=pin)
