"""The pixel conventions every number in ood-audit depends on, written once here.

From Nalisnick et al. (ICLR 2019), section "Conventions" of docs/paper.md:

- pixels k in {0..255}; uniform dequantization x = (k + u) / 256, u ~ U[0, 1)^D;
- discrete log-likelihood bound: log P(k) >= E_u[log p(x)] - D * log 256;
- bits per dimension: bpd = -(log p(x) - D * log 256) / (D * log 2), D = C * H * W.

``log p(x)`` is always the log density of the dequantized x in nats. Models, scorers
and reports cite these functions rather than re-deriving the constants.
"""

from __future__ import annotations

import math
import operator
from typing import TypeVar

import torch

N_BINS = 256  # pixel levels per channel (8-bit images)
LOG_N_BINS = math.log(N_BINS)

T = TypeVar("T")  # float, numpy array or torch tensor: the output follows the input


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 in [0, 1): x = (k + u) / 256, u ~ U[0, 1).

    Every x satisfies ``floor(x * 256) == k`` exactly (see :func:`_place`).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"dequantize expects uint8 pixels, got {images.dtype}")
    u = torch.rand(images.shape, generator=generator, dtype=torch.float32, device=images.device)
    return _place(images.to(torch.float32), u)


def _place(k: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(k + u) / 256 in float32, kept strictly inside [k/256, (k+1)/256).

    In float32, 255 + u rounds up to 256 for u within 2**-17 of 1, which would give
    x = 1.0 and break floor(x * 256) == k; the clamp to the float just below
    (k + 1) / 256 removes that case without moving any other value.
    """
    x = (k + u) / N_BINS
    upper = torch.nextafter((k + 1) / N_BINS, torch.zeros_like(k))
    return torch.minimum(x, upper)


def discrete_log_likelihood_bound(log_px: T, n_dims: int) -> T:
    """log P(k) >= log p(x) - D * log 256, in nats (log_px: density of dequantized x)."""
    return log_px - _check_dims(n_dims) * LOG_N_BINS


def bits_per_dim(log_px: T, n_dims: int) -> T:
    """bpd = -(log p(x) - D * log 256) / (D * log 2); torch tensors, numpy arrays or floats.

    A uniform density on [0, 1)^D (log p = 0) gives exactly 8 bits per dimension.
    """
    d = _check_dims(n_dims)
    return -discrete_log_likelihood_bound(log_px, d) / (d * math.log(2))


def _check_dims(n_dims: int) -> int:
    try:
        d = operator.index(n_dims)  # int, numpy int or 0-d int tensor
    except TypeError:
        d = 0
    if isinstance(n_dims, bool) or d <= 0:
        raise ValueError(f"n_dims must be a positive int (C*H*W), got {n_dims!r}")
    return d
