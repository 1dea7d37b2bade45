"""The hierarchical VAE: its terms are the IWAE bound and its extra columns Havtorn et al.'s
L^>k bounds (recomputed independently from the same draws), both exact on a model whose
likelihood is known, the bound tightens with K, free bits change gradients and never the
loss value, checkpoints round-trip, and the registry builds it for odd and RGB shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import blob_images

from ood_audit.checkpoint import load_checkpoint, save_checkpoint
from ood_audit.config import from_dict
from ood_audit.data.preprocess import bits_per_dim
from ood_audit.errors import UserError
from ood_audit.models.discretized import discretized_mix_logistic_log_prob, pixels_to_centered
from ood_audit.models.hvae import HVAE, HVAE_PRESETS, HVAEConfig
from ood_audit.models.registry import build_model, resolve_model_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _hvae(shape, seed=0, **kw) -> HVAE:
    torch.manual_seed(seed)
    model = HVAE(HVAEConfig(**{**HVAE_PRESETS["tiny"], **kw}), shape).double().eval()
    with torch.no_grad():  # non-trivial priors (their heads start at zero)
        for head in model.p_heads:
            head.weight.normal_(0, 0.3)
            head.bias.normal_(0, 0.3)
    return model


def _normal(mean, log_var):
    return torch.distributions.Normal(mean, torch.exp(0.5 * log_var))


def _reference(model: HVAE, v: torch.Tensor, k: int):
    """log-weights of the full bound [K, B] and of each L^>k, drawn in the model's order
    with densities from torch.distributions and the merge written out with variances."""
    b, n = v.shape[0], model.n_layers
    q_hat = model.bottom_up(v)
    vs = v.repeat(k, 1, 1, 1)
    qs = [(m.repeat(k, *[1] * (m.dim() - 1)), lv.repeat(k, *[1] * (lv.dim() - 1)))
          for m, lv in q_hat]

    def recon(state):
        params = model.out(torch.nn.functional.elu(state))
        return discretized_mix_logistic_log_prob(vs, params, model.config.n_mix).sum((1, 2, 3))

    def dens(dist, z):
        return dist.log_prob(z).flatten(1).sum(1)

    mean_t, lv_t = qs[-1]
    z_top = mean_t + torch.exp(0.5 * lv_t) * torch.randn(mean_t.shape, dtype=mean_t.dtype)
    log_ratio = [dens(_normal(0 * mean_t, 0 * lv_t), z_top) - dens(_normal(mean_t, lv_t), z_top)]
    state, states = model._top_state(z_top), {}
    for i in reversed(range(n - 1)):
        states[i] = state
        mean_p, lv_p = model._layer_prior(i, state)
        mean_h, lv_h = qs[i]
        var_q = 1 / (torch.exp(-lv_h) + torch.exp(-lv_p))
        mean_q = (mean_h * torch.exp(-lv_h) + mean_p * torch.exp(-lv_p)) * var_q
        z = mean_q + var_q.sqrt() * torch.randn(mean_q.shape, dtype=mean_q.dtype)
        log_ratio.insert(0, dens(_normal(mean_p, lv_p), z) - dens(_normal(mean_q, var_q.log()), z))
        state = model._after_layer(i, state, z)
    full = recon(state) + sum(log_ratio)
    skips = []
    for kk in range(1, n):
        state = states[kk - 1]
        for i in reversed(range(kk)):
            mean_p, lv_p = model._layer_prior(i, state)
            state = model._after_layer(i, state, mean_p + torch.exp(0.5 * lv_p)
                                       * torch.randn(mean_p.shape, dtype=mean_p.dtype))
        skips.append((recon(state) + sum(log_ratio[kk:])).view(k, b))
    return full.view(k, b), skips


@pytest.mark.parametrize("channels", [1, 3])
def test_terms_are_the_iwae_bound_and_extras_the_skip_bounds(channels):
    shape = (channels, 8, 8)
    model = _hvae(shape, iw_samples=5)
    k, x = blob_images(3, channels)
    torch.manual_seed(7)
    with torch.no_grad():
        terms, extras = model.score_columns(x)
    assert list(terms) == ["recon", "neg_kl_z1", "neg_kl_z2", "neg_kl_z3", "iw_gain"]
    assert list(extras) == ["log_px_skip1", "log_px_skip2"]
    assert all(t.shape == (3,) and torch.isfinite(t).all() for t in [*terms.values(),
                                                                      *extras.values()])
    torch.manual_seed(7)  # the same draws, in the same order
    with torch.no_grad():
        log_w, skips = _reference(model, pixels_to_centered(k.double()), 5)
    d_log_256 = math.prod(shape) * math.log(256)
    iwae = torch.logsumexp(log_w, 0) - math.log(5) + d_log_256
    torch.testing.assert_close(sum(terms.values()), iwae)
    torch.testing.assert_close(terms["iw_gain"], iwae - log_w.mean(0) - d_log_256)
    assert (terms["iw_gain"] >= 0).all()
    for j, w in enumerate(skips, start=1):
        torch.testing.assert_close(extras[f"log_px_skip{j}"],
                                   torch.logsumexp(w, 0) - math.log(5) + d_log_256)


def test_exact_when_the_posterior_is_the_prior_and_the_decoder_ignores_z():
    """Every importance weight is then P(k | the constant decoder state): the IWAE bound and
    each L^>k equal log P(k) + D log 256 for any K, the KL terms and the gain vanish."""
    shape = (1, 8, 8)
    model = _hvae(shape)
    with torch.no_grad():
        for conv in model.z_in:  # z never reaches the decoder
            conv.weight.zero_()
        model.from_top.weight.zero_()
        for head in model.q_heads:  # an uninformative bottom-up estimate: q = the prior
            head.weight.zero_()
            head.bias.zero_()
            head.bias[head.out_channels // 2:] = 50.0  # clamped to MAX_LOG_VAR
        model.q_top[-1].weight.zero_()
        model.q_top[-1].bias.zero_()
    k, x = blob_images(4, 1)
    v = pixels_to_centered(k.double())
    with torch.no_grad():
        state = model._top_state(torch.zeros(4, model.config.latents[-1], dtype=torch.float64))
        for i in reversed(range(model.n_layers - 1)):
            z = torch.zeros(4, model.config.latents[i], *model.sizes[i + 1], dtype=torch.float64)
            state = model._after_layer(i, state, z)
        exact = model._recon(v, state) + 64 * math.log(256)
        for k_samples in (1, 6):
            model.set_score_option("iw_samples", k_samples)
            terms, extras = model.score_columns(x)
            torch.testing.assert_close(sum(terms.values()), exact, atol=1e-2, rtol=0)
            for name, t in terms.items():
                if name != "recon":
                    assert float(t.abs().max()) < 1e-2, name
            for col in extras.values():
                torch.testing.assert_close(col, exact, atol=1e-2, rtol=0)


def test_one_sample_gain_is_zero_and_bpd_is_minus_log2_pk_per_dim():
    model = _hvae((1, 8, 8), iw_samples=1)
    _, x = blob_images(4, 1)
    torch.manual_seed(1)
    with torch.no_grad():
        terms = model.log_prob_terms(x)
    assert torch.equal(terms["iw_gain"], torch.zeros(4, dtype=torch.float64))
    log_px = sum(terms.values())
    log_pk = log_px - 64 * math.log(256)
    torch.testing.assert_close(bits_per_dim(log_px, 64), -log_pk / (64 * math.log(2)))


def test_bound_tightens_with_more_samples():
    """E[IWAE_1] <= E[IWAE_4] <= E[IWAE_32] (Burda et al. 2016, theorem 1) after a few
    training steps, with seeded draws; IWAE_1 is the one-draw ELBO estimate."""
    model = _hvae((1, 8, 8)).float().train()
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
            bounds[k] = float(np.mean([float(sum(model.log_prob_terms(x).values()).mean())
                                       for _ in range(3)]))
        torch.manual_seed(3)
        elbo = float(np.mean([float(model.elbo(x).mean()) for _ in range(3)]))
    assert bounds[1] < bounds[4] < bounds[32]
    assert abs(bounds[1] - elbo) < 0.05 * abs(elbo)  # the same ELBO, two estimators


def test_free_bits_mask_gradients_never_the_loss_value():
    shape = (1, 8, 8)
    _, x = blob_images(16, 1)
    x = x.float()
    plain = _hvae(shape).float().train()
    free = _hvae(shape, free_bits=1e6).float().train()
    free.load_state_dict(plain.state_dict())
    torch.manual_seed(5)
    loss_plain = plain.training_loss(x)
    torch.manual_seed(5)
    loss_free = free.training_loss(x)
    torch.testing.assert_close(loss_plain, loss_free)  # the true -ELBO either way
    loss_free.sum().backward()
    torch.manual_seed(5)  # every KL below 1e6 nats: the gradient is the reconstruction's
    recon, _ = plain._one_draw(plain._pixels(x))
    (-recon).sum().backward()
    for (name, a), b in zip(free.named_parameters(), plain.parameters(), strict=True):
        ga = a.grad if a.grad is not None else torch.zeros_like(a)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        torch.testing.assert_close(ga, gb, msg=name)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_few_training_steps_lower_the_loss_and_every_layer_carries_information(channels):
    shape = (channels, 8, 8)
    model = _hvae(shape, free_bits=0.5).float().train()
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
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5 * d
    with torch.no_grad():
        kls = [float(k.mean()) for k in model.eval().kl_per_layer(x)]
    assert len(kls) == 3 and min(kls) > 0.1, kls


def test_checkpoint_round_trip_scores_identically(tmp_path):
    shape = (1, 8, 8)
    config, _ = resolve_model_config("hvae", "tiny", {"iw_samples": 3}, shape)
    model = build_model("hvae", config, shape).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, model_name="hvae", model_config=config, run_config={},
                    dataset="blobs", epoch=1)
    again, info = load_checkpoint(path)
    assert isinstance(again, HVAE) and info.model_config == config
    x = torch.rand(6, *shape)
    with torch.no_grad():
        torch.manual_seed(2)
        a = model.score_columns(x)
        torch.manual_seed(2)
        b = again.score_columns(x)
    for left, right in zip(a, b, strict=True):
        assert list(left) == list(right)
        for name in left:
            torch.testing.assert_close(left[name], right[name], rtol=0, atol=0, msg=name)


def test_options_and_config_checks():
    model = _hvae((1, 8, 8))
    model.set_score_option("iw_samples", 3)
    assert model.iw_samples == 3 and model.extra_metadata()["iw_samples"] == "3"
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(UserError, match="iw_samples"):
            model.set_score_option("iw_samples", bad)
    with pytest.raises(UserError, match="no scoring option"):
        model.set_score_option("temperature", 1.0)
    for bad in ({"latents": [4, 4]}, {"latents": [4, 0, 4]}, {"latents": 8}, {"hidden": 0},
                {"blocks": -1}, {"free_bits": -1.0}, {"free_bits": True}, {"iw_samples": 0}):
        with pytest.raises(ValueError):
            HVAEConfig(**bad)
    with pytest.raises(UserError, match="unknown key"):
        from_dict(HVAEConfig, {"latent": [3, 3, 3]}, where="model_config")


@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 28, 28), (1, 32, 32)])
def test_odd_and_even_sizes_and_registry(shape):
    config, notes = resolve_model_config("hvae", "tiny", {"iw_samples": 2,
                                                          "latents": [2, 2, 2, 3]}, shape)
    assert notes == [] and config.latents == [2, 2, 2, 3]
    model = build_model("hvae", config, shape)
    assert isinstance(model, HVAE) and model.input_shape == shape
    with torch.no_grad():
        terms, extras = model.score_columns(torch.rand(2, *shape))
    assert [t for t in terms if t.startswith("neg_kl")] == [f"neg_kl_z{i}" for i in (1, 2, 3, 4)]
    assert list(extras) == ["log_px_skip1", "log_px_skip2", "log_px_skip3"]
    assert all(t.shape == (2,) and torch.isfinite(t).all()
               for t in [*terms.values(), *extras.values()])


def test_trained_run_scores_its_terms_skip_bounds_and_llr_k(tmp_path, tiny_data, tiny_ood):
    """Through train and score: the written terms sum to log_px, the L^>k columns are
    extra columns, and llr-k is among the default detectors with its k recorded."""
    from ood_audit.analysis.tables import load_run_scores
    from ood_audit.commands.score import score_run
    from ood_audit.config import RunConfig, TrainConfig
    from ood_audit.runs import RunDir
    from ood_audit.training.run import train_run

    cfg = RunConfig(model="hvae", preset="tiny", data=str(tiny_data),
                    train=TrainConfig(epochs=1, batch_size=32, limit=96, test_limit=16,
                                      device="cpu"))
    rd = RunDir(train_run(cfg, tmp_path / "hvae", runs_root=tmp_path, log=lambda m: None).run_dir)
    score_run(rd, [str(tiny_ood), "noise-uniform"], limit=12, train_limit=12,
              notify=lambda m: None)
    df, meta = load_run_scores(rd)
    assert meta.terms == ["recon", "neg_kl_z1", "neg_kl_z2", "neg_kl_z3", "iw_gain"]
    np.testing.assert_array_equal(df[meta.terms].sum(axis=1), df["log_px"])
    assert meta.extra_columns[:2] == ["log_px_skip1", "log_px_skip2"]
    assert np.isfinite(df[["log_px_skip1", "log_px_skip2"]]).all().all()
    assert "score_llr-k" in df.columns and meta.extra["llr_k"] in ("1", "2")
    assert meta.extra["model.latents"] == "2,4,4"


@pytest.mark.parametrize("family", ["vae", "hvae"])
def test_iw_samples_is_the_one_scoring_option_of_both_vaes(family):
    from ood_audit.models.registry import build_model, resolve_model_config

    config, _ = resolve_model_config(family, "tiny", {}, (1, 8, 8))
    model = build_model(family, config, (1, 8, 8))
    model.set_score_option("iw_samples", 3)
    assert model.iw_samples == 3
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(UserError, match="iw_samples must be a positive integer"):
            model.set_score_option("iw_samples", bad)
    with pytest.raises(UserError, match="no scoring option 'temperature'"):
        model.set_score_option("temperature", 1.0)
    assert model.iw_samples == 3
