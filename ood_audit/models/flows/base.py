"""The one contract every invertible layer follows, and the small helpers they share.

After bayesiains/nflows: ``forward(x) -> (z, logabsdet)`` maps data to latent,
``inverse(z) -> (x, logabsdet)`` back, and ``logabsdet`` is always a float tensor of
shape ``[B]``. Images are ``[B, C, H, W]`` tensors throughout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2.0 * math.pi)


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 or wider: log-dets are never accumulated in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_sample(value: Tensor, batch: int) -> Tensor:
    """A scalar log-det broadcast to a fresh ``[B]`` tensor (keeps its gradient)."""
    # expand + clone: one kernel, and no ones() tensor allocated per call.
    return _wide(value).reshape(1).expand(batch).clone()


def gaussian_log_density(z: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """Sum over all non-batch dims of log N(z; mean, exp(logs)^2), shape ``[B]``.

    Includes the ``-0.5 * log(2 pi)`` constant per dimension, so it is a true density.
    """
    z, mean, logs = _wide(z), _wide(mean), _wide(logs)
    log_density = -0.5 * (_LOG_2PI + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs))
    return log_density.flatten(1).sum(1)


class FlowLayer(nn.Module):
    """An invertible map with a tractable Jacobian determinant.

    Direction: ``forward`` maps data -> latent, ``inverse`` maps latent -> data.

    - ``forward(x) -> (z, logabsdet)``: ``logabsdet = log|det dz/dx|`` per sample.
    - ``inverse(z) -> (x, logabsdet)``: ``logabsdet = log|det dx/dz|`` per sample, so the
      forward and inverse log-dets of a round trip cancel.

    ``logabsdet`` is always a float tensor of shape ``[B]`` (zeros when the map is
    volume-preserving), never ``None`` or a scalar.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # abstract

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # abstract


def _zeros(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=_wide(x).dtype, device=x.device)
