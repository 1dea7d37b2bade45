"""Seeded random streams: every random number ood-audit draws comes from one of these.

A stream is named by integers (seed, data set key, chunk, epoch, batch...), so a number
never depends on the order things ran in, the batch size or the number of processes.
"""

from __future__ import annotations

import torch


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers, independent of the global RNG."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
