"""Coupling layers (Glow, section 3.3; RealNVP; NICE): affine, and additive as the
variant that overrides one method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FlowLayer, _wide
from .convs import ActNormConv2d, ZeroConv2d


class AffineCoupling(FlowLayer):
    """Affine coupling (Glow, section 3.3; RealNVP).

    ``xa`` (first ``C // 2`` channels) passes through unchanged and conditions ``xb``:
    ``h = NN(xa)``; ``(shift, log_scale) = _scale_shift(h)``; ``zb = (xb + shift) *
    exp(log_scale)``. For affine coupling ``log_scale = log sigmoid(raw + 2)`` (Glow's
    choice: scale in (0, 1), near 0.88 at init). ``h`` is split "cross"-wise like Glow's
    code: shift = ``h[:, 0::2]``, raw scale = ``h[:, 1::2]``.
    ``logabsdet = sum over C, H, W of log_scale``.

    NN is openai/glow's ``f``: Conv3x3(ca -> hidden) -> ActNorm -> ReLU -> Conv1x1(hidden
    -> hidden) -> ActNorm -> ReLU -> :class:`ZeroConv2d` (hidden -> ``params_per_channel *
    cb``), the convs without biases (ActNorm's bias serves) and each conv + ActNorm run as
    one convolution (:class:`ActNormConv2d`); the zero conv makes the layer start as the
    identity. ``edge_bias`` gives the 3x3 convs openai/glow's edge channel. The ReLUs work
    in place: the convs' backward needs their inputs, not their outputs, and a fresh
    hidden-sized tensor per ReLU costs as much as the ReLU.

    ``bf16 = True`` (the ``bf16`` fast path) runs NN under bfloat16 autocast; its output is
    cast back to x's dtype before the affine map, so the shift, the scale and the log-det
    are computed in float32 (or wider).
    """

    #: NN outputs per transformed channel (shift and raw scale).
    params_per_channel: int = 2
    #: run NN in bfloat16 (autocast); everything after it stays in x's dtype
    bf16: bool = False

    def __init__(self, channels: int, hidden: int, edge_bias: bool = False,
                 logscale_factor: float = 3.0):
        super().__init__()
        if channels < 2:
            raise ValueError(f"coupling needs at least 2 channels, got {channels}")
        self.ca = channels // 2
        cb = channels - self.ca
        self.nn = nn.Sequential(
            ActNormConv2d(self.ca, hidden, 3, edge_bias, logscale_factor),
            nn.ReLU(inplace=True),
            ActNormConv2d(hidden, hidden, 1, False, logscale_factor),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden, self.params_per_channel * cb, edge_bias),
        )

    def _scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(shift, log_scale)`` from the NN output; the one method variants override."""
        shift, raw = h[:, 0::2], h[:, 1::2]
        return shift, F.logsigmoid(raw + 2.0)

    def _net(self, xa: Tensor) -> Tensor:
        if not self.bf16:
            return self.nn(xa)
        with torch.autocast(xa.device.type, dtype=torch.bfloat16):
            h = self.nn(xa)
        return h.to(xa.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, : self.ca], x[:, self.ca :]
        shift, log_scale = self._scale_shift(self._net(xa))
        zb = (xb + shift) * torch.exp(log_scale)
        return torch.cat([xa, zb], dim=1), _wide(log_scale).flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        za, zb = z[:, : self.ca], z[:, self.ca :]
        shift, log_scale = self._scale_shift(self._net(za))
        xb = zb * torch.exp(-log_scale) - shift
        return torch.cat([za, xb], dim=1), -_wide(log_scale).flatten(1).sum(1)


class AdditiveCoupling(AffineCoupling):
    """Additive (volume-preserving) coupling ``zb = xb + shift``: "CV-Glow" of
    Nalisnick et al. (ICLR 2019, section 5) and NICE. ``logabsdet`` is zeros[B], so the
    total log-det of a CV-Glow does not depend on x."""

    params_per_channel = 1

    def _scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        # log_scale == 0 exactly: the shared affine path then adds and sums exact zeros.
        return h, torch.zeros_like(h)
