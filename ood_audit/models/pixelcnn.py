"""PixelCNN++ (Salimans, Karpathy, Chen & Kingma, ICLR 2017), after the gated, two-stream
PixelCNN of van den Oord et al. ("Conditional Image Generation with PixelCNN Decoders",
NeurIPS 2016), as a :class:`~ood_audit.models.base.DensityModel`.

Architecture (PixelCNN++ section 2): a *down* stream ``u`` of down-shifted convolutions
sees every row above the current one; a *down-right* stream ``ul`` of down-right-shifted
convolutions sees the rows above and the pixels to the left; together they cover the
whole raster-order past without PixelCNN's blind spot. ``resolutions`` blocks of
``n_resnet`` gated ResNets (concat_elu, gating ``a * sigmoid(b)``) run up at full,
half and quarter resolution (strided down-shifted convs between blocks), then a down
pass mirrors them with transposed convs and skip connections from the up pass. The
output is a discretized logistic mixture per pixel with PixelCNN++'s linear channel
coupling (:mod:`~ood_audit.models.discretized`). As in openai/pixel-cnn: the down pass
has ``n_resnet + 1`` ResNets in every block after the first, the extra input channel of
ones, pixel values at 2k/255 - 1 with bins 2/255 wide. ``fit_resolutions`` lowers
``resolutions`` when H or W is not divisible by 2^(resolutions-1); images are never padded.

Deliberate departures from PixelCNN++ as published (openai/pixel-cnn), each measured at
the README's budget (``tiny``, 1 epoch on 8,000 FashionMNIST images, batch 32, 3 seeds;
``benchmarks/README.md``, ``benchmarks/convergence.py --family pixelcnn``):

- No weight normalisation, hence no data-dependent init: plain convolutions with
  PyTorch's default init, which is the init of pclucas14/pixel-cnn-pp's weight-normed
  convolutions too (it skips openai's data-dependent init). Test bits/dim 3.567 +- 0.006
  as shipped; 3.571 +- 0.022 with weight normalisation (as that port); 3.555 +- 0.010
  with weight normalisation and openai's init (unit-variance outputs, 0.1 on each gated
  ResNet's output conv): 0.012 lower, within two seed sd's, not worth another checkpoint
  layout and a data-dependent first pass. The port itself: 3.599 +- 0.026.
- Dropout off by default (``dropout``; 0.5 in the ``paper`` preset, as openai's CIFAR-10
  run), elementwise as openai's ``tf.nn.dropout`` (pclucas14 drops whole channels): the
  CPU presets underfit at their budgets, where dropout regularises what is not there.
- The interior bins' log-probabilities are exact in log space rather than PixelCNN++'s
  1e-5 mid-point fallback (:mod:`~ood_audit.models.discretized`); elsewhere the numbers
  are the same: pclucas14's weights, converted, give this model its log p(x) to 5e-6.
- Training (the shared :class:`~ood_audit.training.trainer.Trainer`) is Adam (0.9, 0.999)
  with linear warm-up and a bits/dim gradient clip; openai used Adam (0.95, 0.9995), a
  per-step learning-rate decay of 0.999995 and Polyak averaging (``train.ema_decay``).

PixelCNN++ is a model of the integer pixels k: it reads k = floor(256 x) (clamped to
0..255) from the dequantized input. To share the flows' convention it reports the
density p(x) = P(k) * 256^D of x = (k + u) / 256, so ``bits_per_dim(log_px)`` is
-log2 P(k) / D.

Terms written by :meth:`PixelCNN.log_prob_terms` (each ``[B]``, nats): for channel i,

    log_px_c{i} = sum_{pixels j} log P(k_{i,j} | k_{<j}, k_{<i,j}) + H W log 256,

channel i's share of the autoregressive factorisation (for RGB: R, then G | R, then
B | R, G, each conditional of the mixture, see
:func:`~ood_audit.models.discretized.discretized_mix_logistic_log_prob`), plus its even
share H*W*log 256 of the dequantization constant D log 256. They sum to ``log_px``.
:meth:`PixelCNN.score_columns` adds two extra columns (not in the sum): ``pix_center``
and ``pix_border``, the mean per-pixel log P(k) (nats, summed over channels, no
constant) over the central half of rows and columns and over the rest of the image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DensityModel
from .discretized import (
    N_LEVELS,
    discretized_mix_logistic_log_prob,
    n_mix_params,
    pixels_from_unit,
    pixels_to_centered,
)


@dataclass
class PixelCNNConfig:
    """PixelCNN++ size: ``filters`` per stream, ``n_resnet`` gated ResNets per block,
    ``n_mix`` logistic components, ``dropout`` inside the ResNets, ``resolutions``
    blocks (3 in the paper: full, 1/2, 1/4)."""

    filters: int = 160
    n_resnet: int = 5
    n_mix: int = 10
    dropout: float = 0.0
    resolutions: int = 3

    def __post_init__(self) -> None:
        for name in ("filters", "n_resnet", "n_mix", "resolutions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"pixelcnn {name} must be a positive integer, got {value!r}")
        if isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"pixelcnn dropout must be in [0, 1), got {self.dropout!r}")


#: Named sizes. "paper" is PixelCNN++'s CIFAR-10 model (160 filters, 5 ResNets per block,
#: 10 components, dropout 0.5 as in its released code); the others fit a 2-core CPU.
PIXELCNN_PRESETS: dict[str, dict] = {
    "tiny": {"filters": 16, "n_resnet": 1, "n_mix": 2},
    "small": {"filters": 32, "n_resnet": 2, "n_mix": 5},
    "paper": {"filters": 160, "n_resnet": 5, "n_mix": 10, "dropout": 0.5},
}


def fit_resolutions(config: PixelCNNConfig, input_shape: tuple[int, int, int]
                    ) -> tuple[PixelCNNConfig, str | None]:
    """Cap ``config.resolutions`` so H and W halve exactly between blocks; (config, note).

    One resolution fits any size, so this never fails.
    """
    _, height, width = input_shape
    supported = 1
    while (supported < config.resolutions and height % 2**supported == 0
           and width % 2**supported == 0):
        supported += 1
    if supported == config.resolutions:
        return config, None
    note = (f"{height}x{width} input supports {supported} PixelCNN++ resolution(s) (H, W "
            f"divisible by 2^(resolutions-1)); using {supported} instead of {config.resolutions}")
    return dataclasses.replace(config, resolutions=supported), note


# -- shifted convolutions (PixelCNN++ section 2.5; van den Oord et al. 2016) ------------
def down_shift(x: Tensor) -> Tensor:
    """Move every row one down (zeros on top): row i then only holds rows < i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: Tensor) -> Tensor:
    """Move every column one right (zeros on the left)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def concat_elu(x: Tensor) -> Tensor:
    """ELU of [x, -x] on channels: keeps both signs' information (PixelCNN++ 2.4)."""
    return F.elu(torch.cat([x, -x], dim=1))


class DownShiftedConv2d(nn.Module):
    """Conv whose output at row i sees input rows <= i, centred horizontally (pad top)."""

    def __init__(self, cin: int, cout: int, kernel=(2, 3), stride=1, shift_down=False):
        super().__init__()
        self.pad = ((kernel[1] - 1) // 2, (kernel[1] - 1) // 2, kernel[0] - 1, 0)
        self.conv = nn.Conv2d(cin, cout, kernel, stride)
        self.shift_down = shift_down

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.pad(x, self.pad))
        return down_shift(x) if self.shift_down else x


class DownRightShiftedConv2d(nn.Module):
    """Conv whose output at (i, j) sees rows <= i and columns <= j (pad top and left)."""

    def __init__(self, cin: int, cout: int, kernel=(2, 2), stride=1, shift_right=False):
        super().__init__()
        self.pad = (kernel[1] - 1, 0, kernel[0] - 1, 0)
        self.conv = nn.Conv2d(cin, cout, kernel, stride)
        self.shift_right = shift_right

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.pad(x, self.pad))
        return right_shift(x) if self.shift_right else x


class DownShiftedDeconv2d(nn.Module):
    """Stride-2 transposed conv, cropped so it stays down-shifted: n -> 2n."""

    def __init__(self, cin: int, cout: int, kernel=(2, 3)):
        super().__init__()
        self.kernel = kernel
        self.deconv = nn.ConvTranspose2d(cin, cout, kernel, stride=2, output_padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.deconv(x)
        side = (self.kernel[1] - 1) // 2
        return x[:, :, :x.shape[2] - self.kernel[0] + 1, side:x.shape[3] - side]


class DownRightShiftedDeconv2d(nn.Module):
    """Stride-2 transposed conv, cropped at the bottom and right: n -> 2n."""

    def __init__(self, cin: int, cout: int, kernel=(2, 2)):
        super().__init__()
        self.kernel = kernel
        self.deconv = nn.ConvTranspose2d(cin, cout, kernel, stride=2, output_padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.deconv(x)
        return x[:, :, :x.shape[2] - self.kernel[0] + 1, :x.shape[3] - self.kernel[1] + 1]


class GatedResNet(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(concat_elu(conv(concat_elu(x)) + nin(skip)))."""

    def __init__(self, filters: int, conv: type[nn.Module], n_skip: int, dropout: float):
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.skip = nn.Conv2d(2 * n_skip * filters, filters, 1) if n_skip else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv(2 * filters, 2 * filters)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        h = self.conv_in(concat_elu(x))
        if skip is not None:
            h = h + self.skip(concat_elu(skip))
        a, b = self.conv_out(self.dropout(concat_elu(h))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class PixelCNN(DensityModel):
    """PixelCNN++ over x in [0, 1)^D (dequantized pixels), shape ``[B, C, H, W]``."""

    def __init__(self, config: PixelCNNConfig, input_shape: tuple[int, int, int]):
        super().__init__()
        channels, height, width = input_shape
        step = 2 ** (config.resolutions - 1)
        if height % step or width % step:
            raise ValueError(
                f"{height}x{width} input does not support resolutions={config.resolutions} "
                f"(H, W must be divisible by {step}); use fit_resolutions")
        self.config = config
        self.input_shape = (channels, height, width)
        nf, n, r, p = config.filters, config.n_resnet, config.resolutions, config.dropout

        def blocks(count: int, conv: type[nn.Module], n_skip: int) -> nn.ModuleList:
            return nn.ModuleList(GatedResNet(nf, conv, n_skip, p) for _ in range(count))

        # The extra input channel of ones tells the first convs where the image ends,
        # since their zero padding is otherwise indistinguishable from black pixels.
        cin = channels + 1
        self.u_init = DownShiftedConv2d(cin, nf, (2, 3), shift_down=True)
        self.ul_init_down = DownShiftedConv2d(cin, nf, (1, 3), shift_down=True)
        self.ul_init_right = DownRightShiftedConv2d(cin, nf, (2, 1), shift_right=True)
        self.up_u = nn.ModuleList(blocks(n, DownShiftedConv2d, 0) for _ in range(r))
        self.up_ul = nn.ModuleList(blocks(n, DownRightShiftedConv2d, 1) for _ in range(r))
        self.down_size_u = nn.ModuleList(
            DownShiftedConv2d(nf, nf, (2, 3), stride=2) for _ in range(r - 1))
        self.down_size_ul = nn.ModuleList(
            DownRightShiftedConv2d(nf, nf, (2, 2), stride=2) for _ in range(r - 1))
        # The down pass has one more ResNet per block after the first, consuming the
        # up pass's downsampled outputs as skips (PixelCNN++ figure 2).
        down_counts = [n] + [n + 1] * (r - 1)
        self.down_u = nn.ModuleList(blocks(c, DownShiftedConv2d, 1) for c in down_counts)
        self.down_ul = nn.ModuleList(blocks(c, DownRightShiftedConv2d, 2) for c in down_counts)
        self.up_size_u = nn.ModuleList(DownShiftedDeconv2d(nf, nf) for _ in range(r - 1))
        self.up_size_ul = nn.ModuleList(DownRightShiftedDeconv2d(nf, nf) for _ in range(r - 1))
        self.out = nn.Conv2d(nf, n_mix_params(channels, config.n_mix), 1)

    def network(self, v: Tensor) -> Tensor:
        """Mixture parameters ``[B, P, H, W]``; those at pixel i depend only on pixels
        before i in raster order. v: pixel values on the [-1, 1] scale."""
        x = torch.cat([v, torch.ones_like(v[:, :1])], dim=1)
        us = [self.u_init(x)]
        uls = [self.ul_init_down(x) + self.ul_init_right(x)]
        last = self.config.resolutions - 1
        for i in range(self.config.resolutions):
            for u_block, ul_block in zip(self.up_u[i], self.up_ul[i], strict=True):
                us.append(u_block(us[-1]))
                uls.append(ul_block(uls[-1], us[-1]))
            if i < last:
                us.append(self.down_size_u[i](us[-1]))
                uls.append(self.down_size_ul[i](uls[-1]))
        u, ul = us.pop(), uls.pop()
        for i in range(self.config.resolutions):
            for u_block, ul_block in zip(self.down_u[i], self.down_ul[i], strict=True):
                u = u_block(u, us.pop())
                ul = ul_block(ul, torch.cat([u, uls.pop()], dim=1))
            if i < last:
                u, ul = self.up_size_u[i](u), self.up_size_ul[i](ul)
        assert not us and not uls  # every up-pass output used once as a skip
        return self.out(F.elu(ul))

    def conditional_log_probs(self, v: Tensor) -> Tensor:
        """log P(k_{c,j} | k_{<j}, k_{<c,j}) per channel c and pixel j, ``[B, C, H, W]``
        (nats, no dequantization constant); v on the [-1, 1] scale (differentiable)."""
        return discretized_mix_logistic_log_prob(v, self.network(v), self.config.n_mix)

    def _conditionals(self, x: Tensor) -> Tensor:
        return self.conditional_log_probs(pixels_to_centered(pixels_from_unit(x)))

    def _terms(self, cond: Tensor) -> dict[str, Tensor]:
        _, height, width = self.input_shape
        per_channel_constant = height * width * math.log(N_LEVELS)  # D log 256 / C
        sums = cond.flatten(2).sum(-1)  # [B, C]
        return {f"log_px_c{i}": sums[:, i] + per_channel_constant for i in range(sums.shape[1])}

    def log_prob_terms(self, x: Tensor) -> dict[str, Tensor]:
        """``log_px_c{i}`` for each channel i (module docstring); they sum to log p(x)."""
        return self._terms(self._conditionals(x))

    def pixel_log_prob_map(self, x: Tensor) -> Tensor:
        """Per-pixel log P(k_j | k_<j) summed over channels, ``[B, H, W]`` (nats)."""
        return self._conditionals(x).sum(1)

    def score_columns(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(terms, extras) from one forward pass; extras ``pix_center``, ``pix_border``."""
        cond = self._conditionals(x)
        return self._terms(cond), center_border_means(cond.sum(1))

    def extra_metadata(self) -> dict[str, str]:
        return {"n_mix": str(self.config.n_mix), "resolutions": str(self.config.resolutions),
                "likelihood": "discretized_logistic_mixture"}


def center_mask(height: int, width: int, device=None) -> Tensor:
    """True on the central half of rows and of columns: [H//4, H - H//4) x [W//4, W - W//4)."""
    rows = torch.zeros(height, dtype=torch.bool, device=device)
    cols = torch.zeros(width, dtype=torch.bool, device=device)
    rows[height // 4:height - height // 4] = True
    cols[width // 4:width - width // 4] = True
    return rows[:, None] & cols[None, :]


def center_border_means(pixel_map: Tensor) -> dict[str, Tensor]:
    """``pix_center`` / ``pix_border``: means of a ``[B, H, W]`` map inside / outside
    :func:`center_mask` (the border is empty, NaN, only for images under 4 pixels wide)."""
    mask = center_mask(*pixel_map.shape[1:], device=pixel_map.device)
    flat, m = pixel_map.flatten(1), mask.flatten()
    return {"pix_center": flat[:, m].mean(1), "pix_border": flat[:, ~m].mean(1)}
