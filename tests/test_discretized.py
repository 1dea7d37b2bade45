"""The discretized logistic (mixture) likelihood: normalisation over the 256 values,
agreement with independent computations (mpmath, PixelCNN++'s own formula, explicit
loops over mixture components), and the channel-coupled conditionals."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from ood_audit.data.preprocess import _place
from ood_audit.models.discretized import (
    _reference_log_prob,
    discretized_logistic_log_prob,
    discretized_mix_logistic_log_prob,
    n_mix_params,
    pixels_from_unit,
    pixels_to_centered,
)

K = torch.arange(256, dtype=torch.float64)
V = pixels_to_centered(K)  # [256], the 256 values on the [-1, 1] scale


def _exact_log_prob(k: int, mean: float, log_scale: float) -> float:
    """log P(k) in 800-digit arithmetic, straight from the definition."""
    mpmath.mp.dps = 800  # enough digits for 1 - (1 - 1e-550)
    s = mpmath.exp(log_scale)
    v = mpmath.mpf(2 * k) / 255 - 1

    def cdf(t):
        return 1 / (1 + mpmath.exp(-(t - mean) / s))

    upper = 1 if k == 255 else cdf(v + mpmath.mpf(1) / 255)
    lower = 0 if k == 0 else cdf(v - mpmath.mpf(1) / 255)
    return float(mpmath.log(upper - lower))


def test_pixel_scale_round_trips_with_dequantization():
    k = torch.arange(256, dtype=torch.float32)
    for u in (0.0, 0.5, 1.0 - 2**-24):
        x = _place(k, torch.full_like(k, u))
        assert torch.equal(pixels_from_unit(x), k)
    assert pixels_to_centered(torch.tensor([0.0, 255.0])).tolist() == [-1.0, 1.0]
    assert n_mix_params(1, 5) == 15 and n_mix_params(3, 5) == 50  # PixelCNN++'s 3M and 10M


@pytest.mark.parametrize("mean", [-1.5, -1.0, -0.3, 0.0, 0.77, 1.0, 2.0])
@pytest.mark.parametrize("log_scale", [-7.0, -4.0, -2.0, 0.0, 3.0])
def test_single_logistic_sums_to_one(mean, log_scale):
    lp = discretized_logistic_log_prob(V, torch.tensor(mean, dtype=torch.float64),
                                       torch.tensor(log_scale, dtype=torch.float64))
    assert torch.isfinite(lp).all()
    assert abs(float(torch.logsumexp(lp, 0))) < 1e-10
    # float32 stays normalised too (what models train in)
    lp32 = discretized_logistic_log_prob(V.float(), torch.tensor(mean), torch.tensor(log_scale))
    assert torch.isfinite(lp32).all()
    assert abs(float(torch.logsumexp(lp32.double(), 0))) < 1e-4


@pytest.mark.parametrize(("mean", "log_scale"), [(0.1, -3.0), (-0.9, -6.5), (0.95, -5.0),
                                                 (-2.0, -2.5), (0.0, 2.0)])
def test_single_logistic_matches_exact_arithmetic(mean, log_scale):
    """Far tails included (log P down to about -1e3), in float32, where the
    sigmoid-difference formula would underflow without its fallback."""
    ks = [0, 1, 2, 50, 127, 128, 200, 253, 254, 255]
    expected = torch.tensor([_exact_log_prob(k, mean, log_scale) for k in ks],
                            dtype=torch.float64)
    got = discretized_logistic_log_prob(V[ks].float(), torch.tensor(mean),
                                        torch.tensor(log_scale)).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_agrees_with_pixelcnnpp_formula_where_it_is_accurate():
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(256, 40, generator=g, dtype=torch.float64) * 2.4 - 1.2
    log_scale = torch.rand(256, 40, generator=g, dtype=torch.float64) * 4 - 4.5
    ours = discretized_logistic_log_prob(V[:, None], mean, log_scale)
    ref = _reference_log_prob(V[:, None], mean, log_scale)
    plain = ref > math.log(1e-5)  # the reference's exact branch (no mid-point fallback)
    assert plain.float().mean() > 0.2
    torch.testing.assert_close(ours[plain], ref[plain], rtol=1e-9, atol=1e-9)
    # where the reference falls back to pdf * bin width, it is close but not normalised
    assert float((ours[~plain] - ref[~plain]).abs().max()) < 0.5


def _random_params(channels, n_mix, shape=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(1, n_mix_params(channels, n_mix), *shape, generator=g, dtype=torch.float64)
    p[:, n_mix:] *= 0.7  # means around [-1, 1], log-scales around -1.5 below
    rest = p[:, n_mix:].view(1, -1, n_mix, *shape)
    rest[:, channels:2 * channels] -= 1.5
    return p


def _manual_mixture(v, params, n_mix):
    """log sum_m pi_m prod_c P_m(k_c | k_<c), coupling spelled out per component, for one
    pixel position: v [C] and params [P] (both float64)."""
    channels = v.shape[0]
    logits = params[:n_mix]
    rest = params[n_mix:].view(-1, n_mix)
    log_pi = logits - torch.logsumexp(logits, 0)
    total = []
    for m in range(n_mix):
        means = rest[:channels, m].clone()
        log_scales = rest[channels:2 * channels, m]
        c = torch.tanh(rest[2 * channels:, m])
        if channels == 3:  # PixelCNN++: G += c0 R, B += c1 R + c2 G
            means[1] = means[1] + c[0] * v[0]
            means[2] = means[2] + c[1] * v[0] + c[2] * v[1]
        lp = log_pi[m]
        for ch in range(channels):
            lp = lp + discretized_logistic_log_prob(v[ch], means[ch], log_scales[ch])
        total.append(lp)
    return torch.logsumexp(torch.stack(total), 0)


@pytest.mark.parametrize("n_mix", [1, 3])
def test_gray_mixture_sums_to_one_and_matches_components(n_mix):
    params = _random_params(1, n_mix, shape=(1, 1))
    v = V.view(256, 1, 1, 1)
    lp = discretized_mix_logistic_log_prob(v, params.expand(256, -1, -1, -1), n_mix)
    assert lp.shape == (256, 1, 1, 1)
    assert abs(float(torch.logsumexp(lp.flatten(), 0))) < 1e-10
    for k in (0, 17, 128, 255):
        torch.testing.assert_close(lp[k, 0, 0, 0], _manual_mixture(V[k:k + 1], params[0, :, 0, 0],
                                                                   n_mix))


@pytest.mark.parametrize("n_mix", [1, 4])
def test_rgb_conditionals_each_sum_to_one(n_mix):
    """For fixed earlier channels, each channel's conditional normalises over 256 values;
    the channel-0 and channel-1 conditionals do not depend on later channels."""
    params = _random_params(3, n_mix, shape=(1, 1), seed=1)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        fixed = V[torch.randint(0, 256, (3,), generator=g)]
        for c in range(3):
            v = fixed.repeat(256, 1)
            v[:, c] = V  # vary channel c; earlier channels fixed, later ones arbitrary
            if c < 2:
                v[:, c + 1:] = V[torch.randint(0, 256, (256, 2 - c), generator=g)]
            lp = discretized_mix_logistic_log_prob(v.view(256, 3, 1, 1),
                                                   params.expand(256, -1, -1, -1), n_mix)
            assert abs(float(torch.logsumexp(lp[:, c, 0, 0], 0))) < 1e-10
            if c < 2:  # channel c's conditional ignores the later channels' values
                other = v.clone()
                other[:, c + 1:] = 0.0
                lp_other = discretized_mix_logistic_log_prob(
                    other.view(256, 3, 1, 1), params.expand(256, -1, -1, -1), n_mix)
                torch.testing.assert_close(lp[:, :c + 1], lp_other[:, :c + 1])


def test_rgb_joint_of_first_two_channels_sums_to_one():
    params = _random_params(3, 3, shape=(1, 1), seed=3)
    k0, k1 = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    v = torch.stack([V[k0.flatten()], V[k1.flatten()], torch.zeros(256 * 256,
                                                                    dtype=torch.float64)], 1)
    lp = discretized_mix_logistic_log_prob(v.view(-1, 3, 1, 1),
                                           params.expand(v.shape[0], -1, -1, -1), 3)
    assert abs(float(torch.logsumexp(lp[:, 0] + lp[:, 1], 0).squeeze())) < 1e-9


def test_rgb_total_matches_explicit_component_loop():
    n_mix = 3
    params = _random_params(3, n_mix, shape=(2, 3), seed=4)
    g = torch.Generator().manual_seed(5)
    v = V[torch.randint(0, 256, (1, 3, 2, 3), generator=g)]
    lp = discretized_mix_logistic_log_prob(v, params, n_mix).sum(1)  # [1, H, W]
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(lp[0, i, j],
                                       _manual_mixture(v[0, :, i, j], params[0, :, i, j], n_mix))


def test_wrong_parameter_count_is_an_error():
    with pytest.raises(ValueError, match="mixture parameters"):
        discretized_mix_logistic_log_prob(torch.zeros(1, 3, 2, 2), torch.zeros(1, 15, 2, 2), 5)
