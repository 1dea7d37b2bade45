"""PixelCNN++ as a DensityModel: raster-order causality (by autograd), normalisation over
every image of a 2-pixel canvas, per-channel terms, the pixel map's summaries, resolution
fitting and a few training steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import blobs
from torch.autograd.functional import jacobian

from ood_audit.config import from_dict
from ood_audit.errors import UserError
from ood_audit.models.discretized import pixels_to_centered
from ood_audit.models.pixelcnn import (
    PIXELCNN_PRESETS,
    PixelCNN,
    PixelCNNConfig,
    fit_resolutions,
)
from ood_audit.models.registry import build_model, resolve_model_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(shape, resolutions=1, seed=0, perturb=0.3, **kw) -> PixelCNN:
    """A float64 tiny PixelCNN++ with every weight moved off its init."""
    torch.manual_seed(seed)
    cfg = PixelCNNConfig(**{**PIXELCNN_PRESETS["tiny"], "resolutions": resolutions, **kw})
    model = PixelCNN(cfg, shape).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model


def _random_v(shape, n=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return pixels_to_centered(torch.randint(0, 256, (n, *shape), generator=g).double())


def _violations(model, shape):
    """(forbidden nonzero count, allowed-and-nonzero mask) of the conditional log-probs'
    Jacobian w.r.t. the pixel values, and the same count for the mixture parameters.

    Conditional (c, i) may depend on pixels j < i (raster order) and on channels c' <= c
    of pixel i; the network's parameters at pixel i only on pixels j < i."""
    c, h, w = shape
    v = _random_v(shape)
    jac = jacobian(lambda t: model.conditional_log_probs(t.view(1, *shape)).flatten(),
                   v.flatten(), vectorize=True)
    jac = jac.view(c, h * w, c, h * w)  # [out channel, out pixel, in channel, in pixel]
    pix = torch.arange(h * w)
    ch = torch.arange(c)
    earlier_pixel = pix[None, :, None, None] > pix[None, None, None, :]  # j < i
    same_pixel = pix[None, :, None, None] == pix[None, None, None, :]
    earlier_channel = ch[:, None, None, None] >= ch[None, None, :, None]  # c' <= c
    allowed = earlier_pixel | (same_pixel & earlier_channel)
    bad = int((jac[~allowed.expand_as(jac)] != 0).sum())
    pjac = jacobian(lambda t: model.network(t.view(1, *shape)).flatten(1), v.flatten(),
                    vectorize=True)
    pjac = pjac.view(-1, h * w, c, h * w)
    p_allowed = (pix[:, None] > pix[None, :])[None, :, None, :].expand_as(pjac)
    bad_params = int((pjac[~p_allowed] != 0).sum())
    return bad, bad_params, (jac != 0) & allowed


@pytest.mark.parametrize(("shape", "resolutions"), [((1, 5, 5), 1), ((3, 5, 5), 1),
                                                    ((1, 8, 8), 3), ((3, 4, 4), 3)])
def test_causality_by_autograd(shape, resolutions):
    model = _model(shape, resolutions)
    bad, bad_params, used = _violations(model, shape)
    assert bad == 0 and bad_params == 0
    c, h, w = shape
    used = used.view(c, h, w, c, h, w)
    # Not vacuous: the last pixel sees its left and upper neighbours and the first pixel,
    # and (RGB) the later channels see the earlier ones at the same pixel.
    for out_c in range(c):
        assert used[out_c, h - 1, w - 1, 0, h - 1, w - 2]
        assert used[out_c, h - 1, w - 1, 0, h - 2, w - 1]
        assert used[out_c, h - 1, w - 1, 0, 0, 0]
    if c == 3:
        assert used[1, 2, 2, 0, 2, 2] and used[2, 2, 2, 0, 2, 2] and used[2, 2, 2, 1, 2, 2]
    # most of the allowed past is used
    assert used.float().sum() > 0.5 * (c * h * w) ** 2 / 2


def test_causality_check_detects_a_leak():
    """The check above fails on a network that sees the current pixel."""
    model = _model((3, 5, 5))
    model.ul_init_right.shift_right = False  # the down-right stream now sees pixel i
    bad, bad_params, _ = _violations(model, (3, 5, 5))
    assert bad > 0 and bad_params > 0


@pytest.mark.parametrize("shape", [(1, 1, 2), (1, 2, 1)])
def test_probabilities_of_every_image_sum_to_one(shape):
    """All 65536 images of a 2-pixel canvas (a row, then a column): sum P(k) = 1, which
    needs both causality and per-pixel normalisation."""
    model = _model(shape, perturb=0.5, filters=4)
    k = torch.cartesian_prod(torch.arange(256), torch.arange(256)).double()
    v = pixels_to_centered(k).view(-1, *shape)
    with torch.no_grad():
        log_p = model.conditional_log_probs(v).flatten(1).sum(1)
    assert abs(float(torch.logsumexp(log_p, 0))) < 1e-9
    assert float(log_p.std()) > 0.5  # not a uniform model


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8)])
def test_terms_sum_to_log_px_and_match_the_map(shape):
    model = _model(shape, resolutions=3)
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 256, (4, *shape), generator=g).double()
    x = (k + torch.rand(k.shape, generator=g, dtype=torch.float64)) / 256
    terms, extras = model.score_columns(x)
    assert list(terms) == [f"log_px_c{i}" for i in range(shape[0])]
    assert all(t.shape == (4,) and torch.isfinite(t).all() for t in terms.values())
    torch.testing.assert_close(terms, model.log_prob_terms(x))
    cond = model.conditional_log_probs(pixels_to_centered(k))
    d = math.prod(shape)
    for i, value in enumerate(terms.values()):  # channel i's share + H*W log 256
        torch.testing.assert_close(value, cond[:, i].sum((1, 2)) + 64 * math.log(256))
    pixel_map = model.pixel_log_prob_map(x)
    assert pixel_map.shape == (4, 8, 8)
    torch.testing.assert_close(model.log_prob(x), pixel_map.sum((1, 2)) + d * math.log(256))
    # centre = rows and columns 2..5 of 8
    centre = pixel_map[:, 2:6, 2:6].reshape(4, -1).mean(1)
    border = (pixel_map.sum((1, 2)) - pixel_map[:, 2:6, 2:6].sum((1, 2))) / 48
    assert set(extras) == {"pix_center", "pix_border"}
    torch.testing.assert_close(extras["pix_center"], centre)
    torch.testing.assert_close(extras["pix_border"], border)
    # a model of the integers: other dequantization noise, same scores
    x2 = (k + 0.999 * torch.rand(k.shape, generator=g, dtype=torch.float64)) / 256
    torch.testing.assert_close(model.log_prob(x2), model.log_prob(x))


def test_fit_resolutions_and_config_checks():
    paper = PixelCNNConfig(**PIXELCNN_PRESETS["paper"])
    assert fit_resolutions(paper, (3, 32, 32)) == (paper, None)
    assert fit_resolutions(paper, (1, 28, 28)) == (paper, None)
    cfg, note = fit_resolutions(paper, (1, 6, 6))
    assert cfg.resolutions == 2 and "using 2" in note
    assert fit_resolutions(paper, (1, 5, 28))[0].resolutions == 1
    with pytest.raises(ValueError, match="divisible"):
        PixelCNN(paper, (1, 6, 6))
    for bad in ({"filters": 0}, {"n_resnet": -1}, {"n_mix": 1.5}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            PixelCNNConfig(**bad)
    with pytest.raises(UserError, match="unknown key"):
        from_dict(PixelCNNConfig, {"filter": 3}, where="model_config")
    config, notes = resolve_model_config("pixelcnn", "tiny", {}, (1, 10, 10))
    assert config.resolutions == 2 and len(notes) == 1
    model = build_model("pixelcnn", config, (1, 10, 10))
    assert isinstance(model, PixelCNN) and model.input_shape == (1, 10, 10)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_few_training_steps_lower_the_loss(channels):
    torch.manual_seed(0)
    images = torch.from_numpy(blobs(32, size=8, channels=channels))
    if channels == 3:
        images = images.permute(0, 3, 1, 2)
    else:
        images = images[:, None]
    x = (images.float() + torch.rand(images.shape)) / 256
    model = PixelCNN(PixelCNNConfig(**PIXELCNN_PRESETS["tiny"]), x.shape[1:])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model.training_loss(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    d = math.prod(x.shape[1:])
    bpd = [loss / (d * math.log(2)) + 8 for loss in losses]  # -(log_px - D log 256) / D log 2
    assert np.mean(bpd[-3:]) < np.mean(bpd[:3]) - 1.0
    assert np.mean(bpd[-3:]) < 8.0
