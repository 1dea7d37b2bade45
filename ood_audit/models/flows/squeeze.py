"""Space-to-depth: the permutation between the levels of a multi-scale flow."""

from __future__ import annotations

from torch import Tensor

from .base import FlowLayer, _zeros


class Squeeze(FlowLayer):
    """Space-to-depth ``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (RealNVP / Glow): a
    permutation, so ``logabsdet`` is zeros[B]. Output channel ``c * 4 + 2 * i + j`` holds
    pixel ``(2h + i, 2w + j)`` of input channel ``c``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even H and W, got {h}x{w}")
        z = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, c * 4, h // 2, w // 2), _zeros(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, c4, h, w = z.shape
        x = z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c4 // 4, h * 2, w * 2), _zeros(z)
