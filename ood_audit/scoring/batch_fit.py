"""Batches that fit in GPU memory: on CUDA out-of-memory the scorer scores the batch again
in halves, down to one image at a time, and keeps the smaller size for what follows.

The numbers do not depend on it: the noise is fixed per chunk of images, not per batch
(see :mod:`ood_audit.scoring.scorer`), and each image is scored on its own row.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..faults import annotate

Columns = dict[str, np.ndarray]


class ForwardSize:
    """The most images one forward pass takes: ``--batch-size``, halved on CUDA
    out-of-memory. One per command, so the note is said once and the size stays down."""

    def __init__(self, batch_size: int, notify: Callable[[str], None] | None = None):
        self.size = batch_size
        self.notify = notify or (lambda message: None)
        self.halved = False

    def run(self, score: Callable[[torch.Tensor, int], Columns], x: torch.Tensor,
            start: int) -> Columns:
        """``score(x_piece, first image of the piece)`` over ``x`` in pieces of at most
        :attr:`size` images, joined into one set of columns (rows in image order)."""
        parts: list[Columns] = []
        i = 0
        while i < len(x):
            n = min(self.size, len(x) - i)
            try:
                parts.append(score(x[i:i + n], start + i))
            except torch.cuda.OutOfMemoryError as exc:
                if n == 1:
                    annotate(exc, advice="one image at a time does not fit either: score "
                                         "on the CPU (--device cpu) or on a larger GPU")
                    raise
                out_of_memory = True
            else:
                out_of_memory = False
            if out_of_memory:  # outside the except block: its frames no longer pin the tensors
                self._halve(n)
                continue
            i += n
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _halve(self, n: int) -> None:
        self.size = max(1, n // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed pass cached
        if not self.halved:
            self.halved = True
            self.notify(f"CUDA out of memory with {n} images per forward pass: scoring "
                        f"{self.size} at a time from here, halving again if needed "
                        f"(--batch-size {self.size} starts there; the scores are the same)")
