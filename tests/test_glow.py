"""Glow as a DensityModel: exact change of variables, named terms, CV-Glow, ActNorm state
across reloads, and level fitting."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.autograd.functional import jacobian

from ood_audit.config import from_dict
from ood_audit.errors import UserError
from ood_audit.models.flows import ActNorm, SplitPrior
from ood_audit.models.glow import GLOW_PRESETS, Glow, GlowConfig, fit_levels

SHAPES = [(1, 4, 4), (3, 4, 4)]
KINDS = ("actnorm", "invconv", "coupling")


def _tiny(coupling: str = "affine") -> GlowConfig:
    return GlowConfig(**GLOW_PRESETS["tiny"], coupling=coupling)


def _glow(shape, coupling="affine", seed=0, perturb=True) -> Glow:
    """A float64 tiny Glow, data-initialised, with every parameter moved off its init so
    zero-init convs and priors are not trivially identity / standard normal."""
    torch.manual_seed(seed)
    model = Glow(_tiny(coupling), shape).double()
    model.data_init(torch.rand(16, *shape, dtype=torch.float64))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_decode_round_trip(shape, coupling):
    model = _glow(shape, coupling)
    x = torch.rand(5, *shape, dtype=torch.float64)
    zs = model.encode(x)
    assert len(zs) == 2
    assert sum(z[0].numel() for z in zs) == x[0].numel()
    torch.testing.assert_close(model.decode(zs), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("shape", SHAPES)
def test_log_prob_is_exact_change_of_variables(shape, coupling):
    """log p(x) == sum of prior log-densities (by hand) + log|det d concat(z) / dx| (autograd)."""
    model = _glow(shape, coupling)
    x = torch.rand(1, *shape, dtype=torch.float64)

    # Capture each split prior's conditional (mean, logs) as computed from its z1.
    split_outputs = []
    hooks = [m.conv.register_forward_hook(lambda mod, inp, out: split_outputs.append(out))
             for m in model.modules() if isinstance(m, SplitPrior)]
    zs = model.encode(x)
    for h in hooks:
        h.remove()
    assert len(split_outputs) == 1

    def normal(z, mean, logs):
        return torch.distributions.Normal(mean, logs.exp()).log_prob(z).sum()

    h = split_outputs[0]
    top = model.priors[-1]
    log_pz = normal(zs[0], h[:, 0::2], h[:, 1::2]) + normal(zs[1], top.mean, top.logs)

    jac = jacobian(lambda v: torch.cat([z.flatten() for z in model.encode(v.view(x.shape))]),
                   x.flatten())
    assert jac.shape == (x.numel(), x.numel())
    expected = log_pz + torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(model.log_prob(x)[0], expected, rtol=1e-9, atol=1e-9)


def test_log_prob_at_init_uses_standard_normal_priors():
    """Unperturbed priors are N(0, 1): a second, hook-free form of the key check."""
    shape = (1, 4, 4)
    model = _glow(shape, perturb=False)
    x = torch.rand(1, *shape, dtype=torch.float64)
    z = torch.cat([z.flatten() for z in model.encode(x)])
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    jac = jacobian(lambda v: torch.cat([z.flatten() for z in model.encode(v.view(x.shape))]),
                   x.flatten())
    torch.testing.assert_close(model.log_prob(x)[0],
                               log_pz + torch.linalg.slogdet(jac).logabsdet)


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_terms_names_order_shapes_and_sum(coupling):
    model = _glow((3, 4, 4), coupling)
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    terms = model.log_prob_terms(x)
    expected = [name for i in range(2)
                for name in (f"log_pz_level{i}", *(f"logdet_level{i}_{k}" for k in KINDS))]
    assert list(terms) == expected
    for value in terms.values():
        assert value.shape == (4,) and torch.isfinite(value).all()
    torch.testing.assert_close(sum(terms.values()), model.log_prob(x))
    # float32 models keep log-dets in float32
    assert Glow(_tiny(coupling), (1, 4, 4)).log_prob(torch.rand(2, 1, 4, 4)).dtype == torch.float32


def test_additive_coupling_has_constant_volume():
    model = _glow((3, 4, 4), "additive")
    x1 = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    x2 = torch.rand(4, 3, 4, 4, dtype=torch.float64) * 0.2
    t1, t2 = model.log_prob_terms(x1), model.log_prob_terms(x2)
    for i in range(2):
        assert torch.equal(t1[f"logdet_level{i}_coupling"], torch.zeros(4, dtype=torch.float64))

    def total_logdet(terms):
        return sum(v for k, v in terms.items() if k.startswith("logdet_"))

    ld1, ld2 = total_logdet(t1), total_logdet(t2)
    torch.testing.assert_close(ld1, ld2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld1, ld1[:1].expand(4), rtol=0, atol=1e-12)
    # while the affine model's volume term does depend on x
    affine = _glow((3, 4, 4), "affine")
    assert not torch.allclose(total_logdet(affine.log_prob_terms(x1)),
                              total_logdet(affine.log_prob_terms(x2)))


def _actnorm_params(model):
    return [p.detach().clone() for m in model.modules() if isinstance(m, ActNorm)
            for p in (m.bias, m.logs)]


@pytest.mark.parametrize("via", ["state_dict", "safetensors"])
def test_actnorm_state_survives_reload(via, tmp_path):
    shape = (1, 4, 4)
    torch.manual_seed(0)
    model = Glow(_tiny(), shape)
    model.data_init(torch.rand(32, *shape))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if via == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(state, str(tmp_path / "glow.safetensors"))
        state = safetensors_torch.load_file(str(tmp_path / "glow.safetensors"))

    torch.manual_seed(1)
    fresh = Glow(_tiny(), shape)
    fresh.load_state_dict(state)
    actnorms = [m for m in fresh.modules() if isinstance(m, ActNorm)]
    assert actnorms and all(bool(m.initialized) for m in actnorms)
    before = _actnorm_params(fresh)
    x_new = 0.3 * torch.rand(8, *shape) + 0.6  # a batch with very different statistics
    torch.testing.assert_close(fresh.log_prob(x_new), model.log_prob(x_new), rtol=0, atol=0)
    for p, b in zip(_actnorm_params(fresh), before, strict=True):
        assert torch.equal(p, b)


def test_uninitialised_model_does_initialise_on_first_forward():
    """Control for the reload test: without the flag, a forward pass changes ActNorm."""
    torch.manual_seed(0)
    model = Glow(_tiny(), (1, 4, 4))
    before = _actnorm_params(model)
    model.log_prob(torch.rand(8, 1, 4, 4))
    assert any(not torch.equal(p, b) for p, b in zip(_actnorm_params(model), before, strict=True))
    after = _actnorm_params(model)
    model.log_prob(torch.rand(8, 1, 4, 4) * 0.1)
    assert all(torch.equal(p, b) for p, b in zip(_actnorm_params(model), after, strict=True))


def test_sample_shapes_temperature_and_generator():
    model = _glow((3, 4, 4))
    a = model.sample(6, temperature=0.7, generator=torch.Generator().manual_seed(5))
    b = model.sample(6, temperature=0.7, generator=torch.Generator().manual_seed(5))
    assert a.shape == (6, 3, 4, 4) and torch.isfinite(a).all() and torch.equal(a, b)
    assert torch.equal(model.sample(3, temperature=0.0), model.sample(3, temperature=0.0))


def test_training_loss_backward_gives_finite_gradients():
    torch.manual_seed(0)
    model = Glow(_tiny(), (3, 4, 4))
    x = torch.rand(4, 3, 4, 4)
    model.data_init(x)
    model.training_loss(x).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_extra_metadata():
    model = Glow(_tiny("additive"), (1, 4, 4))
    assert model.extra_metadata() == {"coupling": "additive", "levels": "2"}


def test_config_validation():
    assert GlowConfig() == GlowConfig(levels=3, steps=32, hidden=512, coupling="affine")
    for preset in GLOW_PRESETS.values():
        GlowConfig(**preset)
    assert GLOW_PRESETS["paper"] == {"levels": 3, "steps": 32, "hidden": 512}
    for bad in ({"levels": 0}, {"steps": -1}, {"hidden": 0}, {"coupling": "affin"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GlowConfig(**bad)
    with pytest.raises(UserError, match="coupling"):
        from_dict(GlowConfig, {"coupling": "spline"}, "model_config")


def test_fit_levels():
    config = GlowConfig(levels=3)
    fitted, note = fit_levels(config, (1, 28, 28))
    assert fitted.levels == 2 and fitted == dataclasses.replace(config, levels=2)
    assert note == ("28x28 input supports at most 2 levels (H, W divisible by 2^L); "
                    "using levels=2 instead of 3")
    assert fit_levels(config, (3, 32, 32)) == (config, None)
    assert fit_levels(GlowConfig(levels=2), (1, 28, 28)) == (GlowConfig(levels=2), None)
    assert fit_levels(config, (1, 4, 8))[0].levels == 2
    with pytest.raises(UserError, match="27x28"):
        fit_levels(config, (1, 27, 28))
    with pytest.raises(UserError):
        Glow(config, (1, 28, 28))
