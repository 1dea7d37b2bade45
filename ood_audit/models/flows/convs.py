"""The convolutions inside coupling networks and priors (not flow layers themselves):
openai/glow's edge-padded convolution, conv + ActNorm as one convolution, and the
zero-initialised output convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .actnorm import actnorm_init
from .cache import cached


def edge_mask(height: int, width: int, pad: int, like: Tensor) -> Tensor:
    """``[1, 1, H + 2 pad, W + 2 pad]``: 1 on the ``pad``-wide border a "same" convolution
    pads with, 0 over the image (openai/glow's ``add_edge_padding`` channel)."""
    inside = torch.ones(1, 1, height, width, dtype=like.dtype, device=like.device)
    return 1.0 - F.pad(inside, (pad, pad, pad, pad))


class EdgeConv2d(nn.Module):
    """A "same" ``k x k`` convolution with openai/glow's edge bias: an extra input channel
    that is 1 where the kernel reaches into the zero padding and 0 over the image, so a
    layer can tell a border pixel from a dark one (``tfops.add_edge_padding``).

    Computed as the plain zero-padded convolution plus a ``[1, out, H, W]`` map that
    depends on the weights alone (:meth:`edge_term`), never by concatenating the channel:
    the same function, without copying the input. ``edge_weight [out, 1, k, k]`` is that
    channel's kernel; ``edge_bias=False`` leaves it out (y0ast's port).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, edge_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.padding = kernel_size // 2
        self.edge_weight = (nn.Parameter(torch.zeros(out_channels, 1, kernel_size, kernel_size))
                            if edge_bias and kernel_size > 1 else None)

    def edge_term(self, x: Tensor) -> Tensor | None:
        """``[1, out, H, W]``: the edge channel's contribution for ``x``'s H and W, or None."""
        if self.edge_weight is None:
            return None
        h, w = x.shape[2], x.shape[3]

        def compute() -> Tensor:
            mask = edge_mask(h, w, self.padding, self.edge_weight)
            return F.conv2d(mask, self.edge_weight)
        return cached(self, f"edge{h}x{w}", (self.edge_weight,), compute)


class ActNormConv2d(EdgeConv2d):
    """openai/glow's hidden convolution: conv (no bias) -> ActNorm, run as ONE convolution.

    ``y = (conv(x, weight) + edge + bias) * exp(logs * logscale_factor)`` per output
    channel, computed as ``conv(x, weight * s) + (edge + bias) * s`` with ``s`` the scale:
    the ActNorm costs a ``[out]``-sized multiply of the weights instead of two passes over
    a ``[B, out, H, W]`` activation. Data-dependent init (Glow, section 3.1) on the first
    batch, as :class:`ActNorm`. The ActNorm here has no log-det: it sits inside a coupling
    network, not in the flow. Weights start as ``N(0, 0.05)`` (openai/glow's
    ``default_initializer``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 edge_bias: bool = False, logscale_factor: float = 3.0):
        super().__init__(in_channels, out_channels, kernel_size, edge_bias)
        nn.init.normal_(self.weight, std=0.05)
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = float(logscale_factor)
        self.register_buffer("initialized", torch.tensor(False))

    def _plain(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.weight, padding=self.padding)
        edge = self.edge_term(x)
        return y if edge is None else y + edge

    def _is_initialized(self) -> bool:
        if torch.compiler.is_compiling():
            return True
        return cached(self, "initialized", (self.initialized,), lambda: bool(self.initialized))

    def _fused(self) -> tuple[Tensor, Tensor]:
        """(the conv weight with the scale folded in, the scale ``[1, out, 1, 1]``)."""
        scale = torch.exp(self.logs * self.logscale_factor)
        return self.weight * scale.view(-1, 1, 1, 1), scale

    def forward(self, x: Tensor) -> Tensor:
        if not self._is_initialized():
            with torch.no_grad():
                bias, logs = actnorm_init(self._plain(x), self.logscale_factor)
                self.bias.copy_(bias)
                self.logs.copy_(logs)
                self.initialized.fill_(True)
        weight, scale = cached(self, "fused", (self.weight, self.logs), self._fused)
        edge = self.edge_term(x)
        if edge is None:
            bias = cached(self, "bias", (self.bias, self.logs), lambda: (self.bias * scale).view(-1))
            return F.conv2d(x, weight, bias, padding=self.padding)
        return F.conv2d(x, weight, padding=self.padding) + (edge + self.bias) * scale


class ZeroConv2d(EdgeConv2d):
    """3x3 conv with zero-initialised weights and bias and a learned per-channel
    log-scale multiplied by 3 (openai/glow's ``conv2d_zeros``, edge bias included when
    ``edge_bias``): starts as the zero map, so couplings start as the identity and priors
    as standard normal."""

    def __init__(self, in_channels: int, out_channels: int, edge_bias: bool = False):
        super().__init__(in_channels, out_channels, 3, edge_bias)
        nn.init.zeros_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        # The factor 3 lets the scale move faster than plain Adam steps on logs would (Glow code).
        scale = cached(self, "scale", (self.logs,), lambda: torch.exp(self.logs * 3.0))
        y = F.conv2d(x, self.weight, self.bias, padding=self.padding)
        edge = self.edge_term(x)
        return (y if edge is None else y + edge) * scale
