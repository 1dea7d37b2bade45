"""The discretized logistic (mixture) likelihood over 256 pixel values, written once.

Salimans, Karpathy, Chen & Kingma, "PixelCNN++: Improving the PixelCNN with Discretized
Logistic Mixture Likelihood and Other Modifications", ICLR 2017, section 2.1 and 2.2.
Shared by :mod:`~ood_audit.models.pixelcnn` and :mod:`~ood_audit.models.vae`.

Conventions (as in PixelCNN++): a pixel value k in {0..255} enters as
``v = 2k/255 - 1`` in [-1, 1]; bin k covers ``[v - 1/255, v + 1/255]`` and

    P(k) = sigmoid((v + 1/255 - mean) / s) - sigmoid((v - 1/255 - mean) / s),

except that the edge bins take the whole tail: P(0) = sigmoid((v + 1/255 - mean) / s)
(the CDF from -inf) and P(255) = 1 - sigmoid((v - 1/255 - mean) / s). The 256
probabilities therefore telescope to exactly 1.

Numerical stability. PixelCNN++ subtracts two float32 sigmoids and, where the
difference falls below 1e-5, falls back to the density at the bin centre times the bin
width (its "mid-probability" fallback). Here the interior bin is evaluated in log space
with the exact identity

    log(sigmoid(a) - sigmoid(b)) = logsigmoid(a) - softplus(b) + log(-expm1(b - a)),

with ``a - b = 2 / (255 s)`` computed directly rather than by subtraction. This is
finite wherever the fallback would be needed (far tails, tiny or huge scales) and, unlike
the fallback, keeps the 256 probabilities normalised there too.
:func:`_reference_log_prob` keeps PixelCNN++'s formula, fallback included, for tests.

Channel coupling (section 2.2): within one mixture component, channel c's mean is shifted
linearly by the earlier channels' values, ``mean_c + sum_{j<c} coeff_{c,j} * v_j`` (for
RGB: G gets ``c0 * R``, B gets ``c1 * R + c2 * G``), so each pixel is an autoregressive
model over its channels. :func:`discretized_mix_logistic_log_prob` returns the exact
per-channel conditionals log P(k_c | k_<c) of the *mixture* (the mixture weights are
updated by the earlier channels), which sum over channels to log P(pixel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

N_LEVELS = 256
HALF_BIN = 1.0 / 255.0  # half the width of one bin on the [-1, 1] scale
MIN_LOG_SCALE = -7.0  # PixelCNN++'s lower clamp: keeps 1/s finite early in training
MAX_LOG_SCALE = 7.0  # keeps 2/(255 s) far above float underflow (log(-expm1) finite)


def pixels_from_unit(x: Tensor) -> Tensor:
    """Dequantized x in [0, 1) -> integer pixel values k = floor(256 x), clamped to 0..255."""
    return torch.floor(x * N_LEVELS).clamp_(0, N_LEVELS - 1)


def pixels_to_centered(k: Tensor) -> Tensor:
    """Pixel values k in 0..255 -> PixelCNN++'s scale v = 2k/255 - 1 in [-1, 1]."""
    return k * (2.0 / (N_LEVELS - 1)) - 1.0


def n_coupling_coeffs(channels: int) -> int:
    """Coefficients coupling each channel to the earlier ones: C(C-1)/2 (3 for RGB)."""
    return channels * (channels - 1) // 2


def n_mix_params(channels: int, n_mix: int) -> int:
    """Output channels a network predicts per pixel: n_mix * (1 + 2C + C(C-1)/2).

    That is 3 * n_mix for gray and 10 * n_mix for RGB, as in PixelCNN++.
    """
    return n_mix * (1 + 2 * channels + n_coupling_coeffs(channels))


def discretized_logistic_log_prob(x_k: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Per-element log P(k) of one discretized logistic (broadcasting), in nats.

    ``x_k`` is the pixel value k rescaled to [-1, 1] (:func:`pixels_to_centered`);
    ``log_scale`` is clamped to [MIN_LOG_SCALE, MAX_LOG_SCALE]. Edge bins k=0 and k=255
    hold the CDF tails, so the result sums to 1 over the 256 values of k.
    """
    log_scale = log_scale.clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)
    inv_scale = torch.exp(-log_scale)
    centered = x_k - mean
    plus_in = inv_scale * (centered + HALF_BIN)  # a: upper edge of the bin
    min_in = inv_scale * (centered - HALF_BIN)  # b: lower edge of the bin
    log_cdf_plus = F.logsigmoid(plus_in)  # log P(k = 0): the whole lower tail
    log_one_minus_cdf_min = -F.softplus(min_in)  # log P(k = 255): the whole upper tail
    width = (2.0 * HALF_BIN) * inv_scale  # a - b, exact (no cancellation)
    log_interior = log_cdf_plus - F.softplus(min_in) + torch.log(-torch.expm1(-width))
    return torch.where(
        x_k < -0.999,
        log_cdf_plus,
        torch.where(x_k > 0.999, log_one_minus_cdf_min, log_interior),
    )


def _split_params(params: Tensor, channels: int, n_mix: int) -> tuple[Tensor, ...]:
    """[B, P, H, W] -> logits [B, M, H, W], means, log_scales [B, C, M, H, W] and
    coupling coefficients [B, C(C-1)/2, M, H, W] (tanh-squashed, as PixelCNN++)."""
    b, p, h, w = params.shape
    if p != n_mix_params(channels, n_mix):
        raise ValueError(
            f"expected {n_mix_params(channels, n_mix)} mixture parameters for "
            f"{channels} channels and n_mix={n_mix}, got {p}")
    logits = params[:, :n_mix]
    rest = params[:, n_mix:].reshape(b, -1, n_mix, h, w)
    means = rest[:, :channels]
    log_scales = rest[:, channels:2 * channels]
    coeffs = torch.tanh(rest[:, 2 * channels:])
    return logits, means, log_scales, coeffs


def coupled_means(x: Tensor, means: Tensor, coeffs: Tensor) -> Tensor:
    """Channel c's mean shifted by sum_{j<c} coeff_{c,j} * x_j (PixelCNN++ eq. 3).

    x: [B, C, H, W] on the [-1, 1] scale; means: [B, C, M, H, W]; coeffs in the order
    (1,0), (2,0), (2,1), (3,0), ...: for RGB the PixelCNN++ order c0, c1, c2.
    """
    channels = x.shape[1]
    out = [means[:, 0]]
    i = 0
    for c in range(1, channels):
        m = means[:, c]
        for j in range(c):
            m = m + coeffs[:, i] * x[:, j:j + 1]
            i += 1
        out.append(m)
    return torch.stack(out, dim=1)


def mix_logistic_components(x: Tensor, params: Tensor, n_mix: int) -> tuple[Tensor, Tensor]:
    """Log mixture weights [B, M, H, W] and per-component, per-channel conditional
    log P_m(k_c | k_<c) [B, C, M, H, W]; x: [B, C, H, W] on the [-1, 1] scale."""
    logits, means, log_scales, coeffs = _split_params(params, x.shape[1], n_mix)
    means = coupled_means(x, means, coeffs)
    comp = discretized_logistic_log_prob(x.unsqueeze(2), means, log_scales)
    return torch.log_softmax(logits, dim=1), comp


def discretized_mix_logistic_log_prob(x: Tensor, params: Tensor, n_mix: int) -> Tensor:
    """Per-channel conditional log P(k_c | k_<c) of the mixture, shape [B, C, H, W].

    ``x``: [B, C, H, W] pixel values on the [-1, 1] scale; ``params``: [B, P, H, W] with
    P = :func:`n_mix_params` (C, n_mix), laid out as n_mix logits, then C means, C log
    scales and C(C-1)/2 coupling coefficients per component. Summing over C gives
    log P(pixel) = log sum_m pi_m prod_c P_m(k_c | k_<c). The per-channel split is the
    chain rule of the mixture: with L_c = log sum_m pi_m prod_{c' <= c} P_m(k_c' | k_<c'),
    the marginal of the first c channels (each component's conditional normalises),
    channel c's share is L_c - L_{c-1}; each share normalises over the 256 values of k_c.
    """
    log_pi, comp = mix_logistic_components(x, params, n_mix)
    cumulative = log_pi.unsqueeze(1) + torch.cumsum(comp, dim=1)  # [B, C, M, H, W]
    marginals = torch.logsumexp(cumulative, dim=2)  # L_c, [B, C, H, W]
    previous = torch.cat([torch.zeros_like(marginals[:, :1]), marginals[:, :-1]], dim=1)
    return marginals - previous


def _reference_log_prob(x_k: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """PixelCNN++'s original float formula (sigmoid differences, 1e-5 mid-point
    fallback); kept only so tests can check :func:`discretized_logistic_log_prob`."""
    log_scale = log_scale.clamp(min=MIN_LOG_SCALE)
    inv_scale = torch.exp(-log_scale)
    centered = x_k - mean
    plus_in = inv_scale * (centered + HALF_BIN)
    min_in = inv_scale * (centered - HALF_BIN)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_scale * centered
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)
    interior = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                           log_pdf_mid - math.log(127.5))
    return torch.where(x_k < -0.999, plus_in - F.softplus(plus_in),
                       torch.where(x_k > 0.999, -F.softplus(min_in), interior))
