"""The priors of a multi-scale flow, one contract for the split and the top.

A :class:`Prior` takes the latent ``z`` a level ends with and hands part of it out of the
flow: ``forward(z) -> (z_on, z_out, log p(z_out | z_on))``, where ``z_on`` goes on to the
next level (None at the top, which hands out everything) and the log-density has shape
``[B]``. ``inverse(z_on, z_out) -> z`` rejoins them; ``draw(z_on, n, temperature,
generator) -> z_out`` samples. Each split's log p(z_i) stays its own term: folding it
into the log-determinant (as one popular Glow port does) would make the decomposition
impossible.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import gaussian_log_density
from .convs import ZeroConv2d


class Prior(nn.Module):
    """The density of the dimensions one level hands out of the flow (see the module)."""

    def forward(self, z: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        raise NotImplementedError  # abstract

    def inverse(self, z_on: Tensor | None, z_out: Tensor) -> Tensor:
        raise NotImplementedError  # abstract

    def draw(self, z_on: Tensor | None, n: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError  # abstract


class SplitPrior(Prior):
    """Multi-scale split with a learned conditional prior (Glow; RealNVP section 3.6).

    Not a flow layer: it factors half the dimensions out of the flow. Given
    ``z [B, C, H, W]`` it keeps ``z1 = z[:, :C // 2]`` and factors out ``z2 = z[:, C // 2:]``
    with ``log p(z2 | z1) = log N(z2; mean, exp(logs)^2)``, ``(mean, logs)`` from a
    zero-initialised :class:`ZeroConv2d` on ``z1`` ("cross" split: mean = ``h[:, 0::2]``).
    At init the prior is standard normal.
    """

    def __init__(self, channels: int, edge_bias: bool = False):
        super().__init__()
        self.c1 = channels // 2
        self.conv = ZeroConv2d(self.c1, 2 * (channels - self.c1), edge_bias)

    def _mean_logs(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv(z1)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(z1, z2, log p(z2 | z1))``; the last has shape ``[B]``."""
        z1, z2 = z[:, : self.c1], z[:, self.c1 :]
        mean, logs = self._mean_logs(z1)
        return z1, z2, gaussian_log_density(z2, mean, logs)

    def inverse(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Re-join ``z1`` and ``z2`` into ``z`` (the exact inverse of the split)."""
        return torch.cat([z1, z2], dim=1)

    def sample_z2(self, z1: Tensor, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
        """Draw ``z2 ~ N(mean, (temperature * exp(logs))^2)`` given ``z1``."""
        mean, logs = self._mean_logs(z1)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(logs) * temperature * eps

    def draw(self, z_on: Tensor | None, n: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:
        return self.sample_z2(z_on, temperature, generator)


class TopPrior(Prior):
    """Learned diagonal Gaussian over the last level's latent, ``mean`` and ``logs`` of
    shape ``[1, C, H, W]`` initialised to zero (standard normal at init; Glow's
    ``learntop``)."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, channels, height, width))
        self.logs = nn.Parameter(torch.zeros(1, channels, height, width))

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z), shape ``[B]``."""
        return gaussian_log_density(z, self.mean, self.logs)

    def sample(self, n: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        shape = (n, *self.mean.shape[1:])
        eps = torch.randn(shape, generator=generator, dtype=self.mean.dtype,
                          device=self.mean.device)
        return self.mean + torch.exp(self.logs) * temperature * eps

    def forward(self, z: Tensor) -> tuple[None, Tensor, Tensor]:
        """``(None, z, log p(z))``: the top hands out everything that is left."""
        return None, z, self.log_prob(z)

    def inverse(self, z_on: None, z_out: Tensor) -> Tensor:
        return z_out

    def draw(self, z_on: None, n: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:
        return self.sample(n, temperature, generator)
