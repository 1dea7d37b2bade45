"""Invertible layers: the shared FlowLayer contract, checked on every layer, plus the
layer-specific facts (ActNorm init, LU weight, zero-init coupling, priors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from ood_audit.models.flows import (
    ActNorm,
    ActNormConv2d,
    AdditiveCoupling,
    AffineCoupling,
    FlowLayer,
    InvConv1x1,
    SplitPrior,
    Squeeze,
    TopPrior,
    ZeroConv2d,
    gaussian_log_density,
)

SHAPE = (1, 4, 2, 2)  # tiny, so the dense Jacobian is 16 x 16


@torch.no_grad()
def _perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter off its init, so zero-init layers are not trivially identity."""
    for p in module.parameters():
        p.add_(scale * torch.randn_like(p))


def _actnorm() -> FlowLayer:
    layer = ActNorm(4).double()
    layer(torch.randn(8, 4, 2, 2, dtype=torch.float64) * 3 + 1)  # data-dependent init
    return layer


LAYERS = {
    "actnorm": _actnorm,
    "invconv": lambda: InvConv1x1(4).double(),
    "affine": lambda: AffineCoupling(4, 8).double(),
    "additive": lambda: AdditiveCoupling(4, 8).double(),
    "squeeze": lambda: Squeeze(),
}


@pytest.fixture(params=sorted(LAYERS))
def layer(request) -> FlowLayer:
    torch.manual_seed(0)
    layer = LAYERS[request.param]()
    _perturb(layer)
    return layer


def test_contract_shapes_and_finiteness(layer):
    x = torch.randn(3, *SHAPE[1:], dtype=torch.float64)
    z, ld = layer(x)
    assert z.numel() == x.numel() and z.shape[0] == 3
    assert ld.shape == (3,) and ld.dtype == torch.float64
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    x_back, ld_inv = layer.inverse(z)
    assert ld_inv.shape == (3,)


def test_inverse_of_forward_is_identity(layer):
    x = torch.randn(3, *SHAPE[1:], dtype=torch.float64)
    z, _ = layer(x)
    x_back, _ = layer.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    # and the other way round
    z2 = torch.randn_like(z)
    torch.testing.assert_close(layer(layer.inverse(z2)[0])[0], z2, rtol=1e-10, atol=1e-10)


def test_forward_and_inverse_logdets_cancel(layer):
    x = torch.randn(3, *SHAPE[1:], dtype=torch.float64)
    z, ld = layer(x)
    _, ld_inv = layer.inverse(z)
    torch.testing.assert_close(ld + ld_inv, torch.zeros(3, dtype=torch.float64),
                               rtol=0, atol=1e-10)


def test_logabsdet_equals_autograd_jacobian(layer):
    x = torch.randn(*SHAPE, dtype=torch.float64)
    z, ld = layer(x)
    jac = jacobian(lambda v: layer(v.view(SHAPE))[0].flatten(), x.flatten())
    expected = torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(ld[0], expected, rtol=1e-9, atol=1e-9)
    # the inverse's log-det is log|det| of the inverse map at z
    jac_inv = jacobian(lambda v: layer.inverse(v.view(z.shape))[0].flatten(), z.flatten())
    torch.testing.assert_close(layer.inverse(z)[1][0], torch.linalg.slogdet(jac_inv).logabsdet,
                               rtol=1e-9, atol=1e-9)


def test_actnorm_initialises_once_to_zero_mean_unit_variance():
    torch.manual_seed(0)
    layer = ActNorm(3)
    assert not bool(layer.initialized)
    x = torch.randn(64, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 2.0
    z, ld = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), correction=0), torch.ones(3),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(ld, torch.full((64,), 16 * layer.log_scale().sum().item()))
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.randn(64, 3, 4, 4) * 100)  # a very different batch must not re-initialise
    for p, b in zip(layer.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert "initialized" in layer.state_dict()


def test_invconv_weight_and_logdet():
    torch.manual_seed(0)
    layer = InvConv1x1(6).double()
    _perturb(layer)
    w = layer.weight()
    torch.testing.assert_close(w @ layer.weight_inverse(), torch.eye(6, dtype=torch.float64))
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    _, ld = layer(x)
    torch.testing.assert_close(ld, torch.full((2,), 15 * torch.linalg.slogdet(w).logabsdet.item(),
                                              dtype=torch.float64))
    # the weight acts as a matrix on channels
    z, _ = layer(x)
    torch.testing.assert_close(z, torch.einsum("ij,bjhw->bihw", w, x))


def test_invconv_starts_orthogonal_with_unit_diagonal_lower():
    torch.manual_seed(0)
    layer = InvConv1x1(5)
    w = layer.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(5), rtol=0, atol=1e-5)
    x = torch.randn(2, 5, 2, 2)
    torch.testing.assert_close(layer(x)[1], torch.zeros(2), rtol=0, atol=1e-5)


def test_invconv_uses_global_rng():
    torch.manual_seed(7)
    a = InvConv1x1(4).weight()
    torch.manual_seed(7)
    b = InvConv1x1(4).weight()
    torch.manual_seed(8)
    c = InvConv1x1(4).weight()
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_affine_coupling_at_init_is_fixed_scale_and_keeps_first_half():
    torch.manual_seed(0)
    layer = AffineCoupling(4, 8)
    x = torch.randn(2, 4, 3, 3)
    z, ld = layer(x)
    scale = torch.sigmoid(torch.tensor(2.0))  # zero NN output -> sigmoid(0 + 2)
    torch.testing.assert_close(z[:, :2], x[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(z[:, 2:], x[:, 2:] * scale)
    torch.testing.assert_close(ld, torch.full((2,), 2 * 9 * math.log(scale.item())))


def test_additive_coupling_logdet_is_exactly_zero_and_shift_only():
    torch.manual_seed(0)
    layer = AdditiveCoupling(4, 8)
    _perturb(layer)
    x = torch.randn(3, 4, 2, 2)
    z, ld = layer(x)
    assert torch.equal(ld, torch.zeros(3))
    assert torch.equal(layer.inverse(z)[1], torch.zeros(3))
    shift = layer.nn(x[:, :2])
    torch.testing.assert_close(z[:, 2:], x[:, 2:] + shift)


def test_coupling_variants_differ_only_in_nn_head():
    affine, additive = AffineCoupling(4, 8), AdditiveCoupling(4, 8)
    assert affine.nn[-1].out_channels == 4 and additive.nn[-1].out_channels == 2
    assert type(additive).forward is AffineCoupling.forward


def test_zero_conv_starts_at_zero_and_scales_by_exp_3_logs():
    conv = ZeroConv2d(2, 3)
    x = torch.randn(2, 2, 4, 4)
    assert torch.equal(conv(x), torch.zeros(2, 3, 4, 4))
    with torch.no_grad():
        conv.bias.fill_(1.0)
        conv.logs.fill_(0.5)
    torch.testing.assert_close(conv(x), torch.full((2, 3, 4, 4), math.exp(1.5)))


def test_squeeze_is_space_to_depth():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    z, ld = Squeeze()(x)
    assert z.shape == (1, 4, 2, 2)
    # channel 2*i + j holds pixel (2h + i, 2w + j)
    torch.testing.assert_close(z[0, :, 0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))
    torch.testing.assert_close(z[0, 3], torch.tensor([[5.0, 7.0], [13.0, 15.0]]))
    assert torch.equal(ld, torch.zeros(1))


def _normal_log_prob(z, mean, logs):
    return torch.distributions.Normal(mean, logs.exp()).log_prob(z).flatten(1).sum(1)


def test_gaussian_log_density_matches_torch_distributions():
    torch.manual_seed(0)
    z, mean, logs = (torch.randn(3, 2, 2, 2, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(gaussian_log_density(z, mean, logs), _normal_log_prob(z, mean, logs))


def test_split_prior_round_trip_and_conditional_density():
    torch.manual_seed(0)
    split = SplitPrior(6).double()
    z = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    z1, z2, log_pz = split(z)
    assert z1.shape == (2, 3, 3, 3) and z2.shape == (2, 3, 3, 3) and log_pz.shape == (2,)
    # zero-init: standard normal
    torch.testing.assert_close(log_pz, _normal_log_prob(z2, torch.zeros_like(z2),
                                                        torch.zeros_like(z2)))
    _perturb(split)
    z1, z2, log_pz = split(z)
    assert torch.equal(split.inverse(z1, z2), z)
    h = split.conv(z1)
    torch.testing.assert_close(log_pz, _normal_log_prob(z2, h[:, 0::2], h[:, 1::2]))
    gen = torch.Generator().manual_seed(3)
    s1 = split.sample_z2(z1, 0.7, gen)
    s2 = split.sample_z2(z1, 0.7, torch.Generator().manual_seed(3))
    assert s1.shape == z2.shape and torch.equal(s1, s2)


def test_top_prior_is_standard_normal_at_init_and_learned_after():
    prior = TopPrior(2, 2, 2)
    z = torch.randn(4, 2, 2, 2)
    torch.testing.assert_close(prior.log_prob(z), _normal_log_prob(z, torch.zeros_like(z),
                                                                   torch.zeros_like(z)))
    _perturb(prior)
    torch.testing.assert_close(prior.log_prob(z), _normal_log_prob(z, prior.mean, prior.logs))
    assert prior.sample(5, 0.5).shape == (5, 2, 2, 2)


def _edge_conv_by_definition(x, weight, edge_weight, bias=None):
    """openai/glow's edge padding, written out: pad x with zeros, concatenate a channel
    that is 1 on the padded border, convolve 'valid' with [weight | edge_weight]."""
    pad = weight.shape[-1] // 2
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ring = torch.ones_like(xp[:, :1])
    ring[:, :, pad:-pad, pad:-pad] = 0
    return torch.nn.functional.conv2d(torch.cat([xp, ring], 1), torch.cat([weight, edge_weight], 1), bias)


def test_zero_conv_edge_channel_equals_the_concatenated_border_channel():
    torch.manual_seed(0)
    conv = ZeroConv2d(3, 4, edge_bias=True).double()
    _perturb(conv)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    expected = _edge_conv_by_definition(x, conv.weight, conv.edge_weight, conv.bias)
    torch.testing.assert_close(conv(x), expected * torch.exp(3 * conv.logs))


@pytest.mark.parametrize("edge", [False, True])
def test_actnorm_conv_is_conv_then_actnorm_in_one_convolution(edge):
    """ActNormConv2d == conv (no bias) -> ActNorm, the ActNorm initialised on the first
    batch to zero mean / unit variance per output channel, then free parameters."""
    torch.manual_seed(0)
    conv = ActNormConv2d(3, 5, 3, edge_bias=edge).double()
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * 2 + 1
    y = conv(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), correction=0), torch.ones(5, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    _perturb(conv)
    edge_w = conv.edge_weight if edge else torch.zeros(5, 1, 3, 3, dtype=torch.float64)
    plain = _edge_conv_by_definition(x, conv.weight, edge_w)
    expected = (plain + conv.bias) * torch.exp(conv.logs * conv.logscale_factor)
    torch.testing.assert_close(conv(x), expected)
    conv.eval()
    with torch.no_grad():  # the scoring cache of the folded weights gives the same numbers
        torch.testing.assert_close(conv(x), expected)
        torch.testing.assert_close(conv(x), expected)
