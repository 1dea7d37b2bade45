"""The VAE as a DensityModel: its terms sum to the IWAE bound (checked against an
independent computation with torch.distributions), the bound tightens with K, the
dequantization constant, scoring options and a few training steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import blob_images

from ood_audit.config import from_dict
from ood_audit.data.preprocess import bits_per_dim
from ood_audit.errors import UserError
from ood_audit.models.discretized import discretized_mix_logistic_log_prob, pixels_to_centered
from ood_audit.models.registry import build_model, resolve_model_config
from ood_audit.models.vae import VAE, VAE_PRESETS, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _vae(shape, seed=0, **kw) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(**{**VAE_PRESETS["tiny"], **kw}), shape).double().eval()


@pytest.mark.parametrize("channels", [1, 3])
def test_terms_are_the_iwae_bound(channels):
    """recon + neg_kl + iw_gain == log mean_k w_k + D log 256, with q, p(z) and p(k | z)
    evaluated here independently from the same z draws."""
    shape = (channels, 8, 8)
    model = _vae(shape, iw_samples=5)
    k, x = blob_images(3, channels)
    torch.manual_seed(7)
    terms = model.log_prob_terms(x)
    assert list(terms) == ["recon", "neg_kl", "iw_gain"]
    assert all(t.shape == (3,) and torch.isfinite(t).all() for t in terms.values())

    v = pixels_to_centered(k.double())
    mean, log_std = model.encode(v)
    torch.manual_seed(7)  # the same z draws as log_prob_terms
    z = mean + log_std.exp() * torch.randn(5, *mean.shape, dtype=torch.float64)
    q = torch.distributions.Normal(mean, log_std.exp())
    prior = torch.distributions.Normal(0.0, 1.0)
    log_w, recon = [], []
    for s in range(5):
        params = model.decode(z[s])
        r = discretized_mix_logistic_log_prob(v, params, model.config.n_mix).sum((1, 2, 3))
        recon.append(r)
        log_w.append(r + prior.log_prob(z[s]).sum(-1) - q.log_prob(z[s]).sum(-1))
    log_w, recon = torch.stack(log_w), torch.stack(recon)
    d_log_256 = math.prod(shape) * math.log(256)  # the constant, all in "recon"
    iwae = torch.logsumexp(log_w, 0) - math.log(5) + d_log_256
    torch.testing.assert_close(terms["recon"] + terms["neg_kl"] + terms["iw_gain"], iwae)
    torch.testing.assert_close(terms["recon"], recon.mean(0) + d_log_256)
    torch.testing.assert_close(terms["neg_kl"], (log_w - recon).mean(0))
    assert (terms["iw_gain"] >= 0).all()
    torch.testing.assert_close(terms["iw_gain"], iwae - log_w.mean(0) - d_log_256)


def test_one_sample_gain_is_zero_and_bpd_is_minus_log2_pk_per_dim():
    shape = (1, 8, 8)
    model = _vae(shape)
    model.set_score_option("iw_samples", 1)
    k, x = blob_images(4, 1)
    torch.manual_seed(1)
    terms = model.log_prob_terms(x)
    assert torch.equal(terms["iw_gain"], torch.zeros(4, dtype=torch.float64))
    # bpd from log_px is -log2 P(k) / D for the discrete bound log P(k) = log_px - D log 256
    log_pk = terms["recon"] + terms["neg_kl"] - 64 * math.log(256)
    torch.testing.assert_close(bits_per_dim(terms["recon"] + terms["neg_kl"], 64),
                               -log_pk / (64 * math.log(2)))
    # a model of the integers: other dequantization noise, same draws, same scores
    x2 = (k.double() + 0.999 * torch.rand(k.shape, dtype=torch.float64)) / 256
    torch.manual_seed(1)
    torch.testing.assert_close(model.log_prob_terms(x2), terms)


def test_bound_tightens_with_more_samples():
    """IWAE_K >= ELBO on average, and E[IWAE_1] <= E[IWAE_4] <= E[IWAE_32] (Burda et al.
    2016, theorem 1), on a briefly trained model with a fixed batch and seeded draws."""
    shape = (1, 8, 8)
    model = _vae(shape).float()
    _, x = blob_images(64, 1)
    x = x.float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model.training_loss(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    bounds = {}
    with torch.no_grad():
        for k in (1, 4, 32):
            model.set_score_option("iw_samples", k)
            torch.manual_seed(11)
            runs = [model.log_prob_terms(x) for _ in range(3)]
            bounds[k] = float(np.mean([float(sum(t.values()).mean()) for t in runs]))
            gains = torch.stack([t["iw_gain"] for t in runs])
            assert (gains >= 0).all()
            if k > 1:
                assert float(gains.mean()) > 0.1  # a real gap to close at this size
            elbo = np.mean([float((t["recon"] + t["neg_kl"]).mean()) for t in runs])
            assert bounds[k] >= elbo
        torch.manual_seed(3)
        analytic_elbo = float(np.mean([float(model.elbo(x).mean()) for _ in range(3)]))
    assert bounds[1] < bounds[4] < bounds[32]
    assert abs(bounds[1] - analytic_elbo) < 0.05 * abs(analytic_elbo)  # the same ELBO


def test_iw_samples_option_and_config_checks():
    model = _vae((1, 8, 8))
    model.set_score_option("iw_samples", 3)
    assert model.iw_samples == 3 and model.extra_metadata()["iw_samples"] == "3"
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(UserError, match="iw_samples"):
            model.set_score_option("iw_samples", bad)
    with pytest.raises(UserError, match="no scoring option"):
        model.set_score_option("temperature", 1.0)
    for bad in ({"latent": 0}, {"hidden": -1}, {"n_mix": 1.5}, {"iw_samples": 0}):
        with pytest.raises(ValueError):
            VAEConfig(**bad)
    with pytest.raises(UserError, match="unknown key"):
        from_dict(VAEConfig, {"latents": 3}, where="model_config")


@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 28, 28), (1, 32, 32)])
def test_odd_and_even_sizes_and_registry(shape):
    config, notes = resolve_model_config("vae", "tiny", {"iw_samples": 2}, shape)
    assert notes == [] and config.iw_samples == 2
    model = build_model("vae", config, shape)
    assert isinstance(model, VAE) and model.input_shape == shape
    terms, extras = model.score_columns(torch.rand(2, *shape))
    assert extras == {} and all(t.shape == (2,) for t in terms.values())
    assert model.decode(torch.zeros(1, config.latent)).shape[2:] == shape[1:]


@pytest.mark.parametrize("channels", [1, 3])
def test_a_few_training_steps_lower_the_loss(channels):
    shape = (channels, 8, 8)
    model = _vae(shape).float().train()
    _, x = blob_images(64, channels)
    x = x.float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model.training_loss(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    d = math.prod(shape)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5 * d  # at least 0.7 bits/dim
    model.eval()
    with torch.no_grad():
        bpd = bits_per_dim(model.log_prob(x), d)
    assert torch.isfinite(bpd).all() and float(bpd.mean()) < 8.5
