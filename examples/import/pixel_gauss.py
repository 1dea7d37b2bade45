"""A plain torch module for ``ood-audit import python``: a diagonal Gaussian per pixel.

Nothing here knows ood-audit: ``log_prob(y)`` gives the log-density in nats of images y in
[-1, 1] (``--input-range -1,1``), one per image. Fit its weights to a data set's train
images (the per-pixel mean and standard deviation) and audit it:

    python examples/import/pixel_gauss.py fashionmnist pixel_gauss.safetensors
    ood-audit import python examples/import/pixel_gauss.py:make --weights pixel_gauss.safetensors \\
        --input-range -1,1 --data fashionmnist --out runs/pixel-gauss
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn


class PixelGauss(nn.Module):
    def __init__(self, shape=(1, 28, 28)):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(shape))
        self.log_std = nn.Parameter(torch.zeros(shape))

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        z = (y - self.mean) / self.log_std.exp()
        return (-0.5 * z**2 - self.log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def make() -> PixelGauss:
    return PixelGauss()


def fit(data: str, out: str) -> None:
    """Per-pixel mean and standard deviation of ``data``'s train images, dequantized and
    scaled to [-1, 1], saved as the module's state dict."""
    from safetensors.torch import save_file

    from ood_audit.data.preprocess import dequantize
    from ood_audit.data.registry import load_dataset

    images = load_dataset(data, "train").images
    y = 2 * dequantize(images, torch.Generator().manual_seed(0)) - 1
    save_file({"mean": y.mean(0), "log_std": y.std(0).clamp_min(1e-2).log()}, out)


if __name__ == "__main__":
    fit(*sys.argv[1:3])
