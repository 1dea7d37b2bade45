"""ActNorm (Glow, section 3.1): a per-channel affine map with data-dependent init."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import FlowLayer, _per_sample
from .cache import cached


def actnorm_init(y: Tensor, logscale_factor: float) -> tuple[Tensor, Tensor]:
    """ActNorm's data-dependent init from a batch ``y [B, C, H, W]``: ``(bias, logs)``, each
    ``[1, C, 1, 1]``, so that ``(y + bias) * exp(logs * logscale_factor)`` has zero mean and
    unit variance per channel (Glow, section 3.1; ``1e-6`` guards a constant channel)."""
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    std = y.std(dim=(0, 2, 3), keepdim=True, correction=0)
    return -mean, -torch.log(std + 1e-6) / logscale_factor


class ActNorm(FlowLayer):
    """Per-channel affine ``z = (x + bias) * exp(logs * logscale_factor)`` (Glow, section 3.1).

    Data-dependent init: the first ``forward`` while ``initialized == 0`` sets the bias and
    log-scale so that batch leaves with zero mean and unit variance per channel
    (:func:`actnorm_init`). ``initialized`` is a registered buffer, so it travels with
    ``state_dict``/safetensors and a reloaded model is never re-initialised.
    ``logscale_factor`` is openai/glow's (3): the stored ``logs`` is a third of the
    log-scale, so Adam moves the scale three times faster (Adam's step does not depend on
    the gradient's size). ``logabsdet = H * W * sum(logs) * logscale_factor``.
    """

    def __init__(self, channels: int, logscale_factor: float = 3.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logscale_factor = float(logscale_factor)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias and log-scale from the batch ``x`` and mark the layer initialised."""
        bias, logs = actnorm_init(x, self.logscale_factor)
        self.bias.copy_(bias)
        self.logs.copy_(logs)
        self.initialized.fill_(True)

    def log_scale(self) -> Tensor:
        """The per-channel log-scale ``[1, C, 1, 1]`` actually applied."""
        return self.logs * self.logscale_factor

    def _logabsdet(self, x: Tensor) -> Tensor:
        log_det = cached(self, "logdet", (self.logs,), lambda: self.log_scale().sum())
        return _per_sample(x.shape[2] * x.shape[3] * log_det, x.shape[0])

    def _is_initialized(self) -> bool:
        if torch.compiler.is_compiling():
            return True  # compiled paths run on initialised models (data_init runs eagerly)
        # Cached so scoring does not pay a device sync (bool of a tensor) per layer per batch.
        return cached(self, "initialized", (self.initialized,), lambda: bool(self.initialized))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self._is_initialized():
            self.initialize(x)
        scale = cached(self, "scale", (self.logs,), lambda: torch.exp(self.log_scale()))
        return (x + self.bias) * scale, self._logabsdet(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z * torch.exp(-self.log_scale()) - self.bias, -self._logabsdet(z)
