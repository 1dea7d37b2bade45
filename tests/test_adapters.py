"""The flow-library adapters (ood_audit/models/adapters) and the module wrapper of the
Python API (ood_audit/api/wrap.py).

For each library a small image flow (1x8x8 images, or their 64 flattened pixels) is built
with the library itself, and the adapter's terms must sum to the library's own
``log_prob`` (1e-5 relative), split into ``log_pz`` and the per-transform log-dets the
library exposes, with ``log_pz + logdet == log_px``. Each library is skipped, visibly,
when it is not installed (``pip install ood-audit[flows]``; the dev extra has them).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ood_audit.api.wrap import INPUT_RANGES, wrap_module
from ood_audit.errors import UserError
from ood_audit.models.adapters import ADAPTERS, adapter_for
from ood_audit.models.base import sum_terms
from ood_audit.scoring.schema import totals_for

# normflows' Invertible1x1Conv calls torch.lu, which this torch deprecates
pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning")

SHAPE = (1, 8, 8)
D = math.prod(SHAPE)


def _x(n: int = 6, seed: int = 1) -> torch.Tensor:
    """Dequantized-looking images in [0, 1), [n, 1, 8, 8]."""
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


def _split(terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(z) and log|det| as the scorer groups them (schema.totals_for)."""
    groups = totals_for(list(terms))
    log_pz = (sum_terms({t: terms[t] for t in groups["log_pz"]}) if "log_pz" in groups
              else terms["log_pz"])
    logdet = (sum_terms({t: terms[t] for t in groups["logdet"]}) if "logdet" in groups
              else terms["logdet"])
    return log_pz, logdet


def _check(flow, y: torch.Tensor, reference: torch.Tensor, library: str) -> dict:
    """The adapter's terms: [B] each, summing to ``reference``, log p(z) + log|det| too."""
    adapter = adapter_for(flow)
    assert adapter is not None and adapter.name == library
    with torch.no_grad():
        terms = adapter.terms(flow, y)
    assert all(tuple(v.shape) == (len(y),) for v in terms.values()), terms
    _close(sum_terms(terms), reference)
    log_pz, logdet = _split(terms)
    _close(log_pz + logdet, reference)
    assert not torch.allclose(logdet, logdet[0].expand_as(logdet))  # per-sample, not constant
    return terms


# --- normflows -------------------------------------------------------------------------


def _normflows_flat():
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    flows = []
    for i in range(2):
        mask = (torch.arange(D) + i) % 2
        flows += [nf.flows.MaskedAffineFlow(mask, nf.nets.MLP([D, 16, D], init_zeros=False),
                                            nf.nets.MLP([D, 16, D], init_zeros=False)),
                  nf.flows.ActNorm(D)]
    flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(D), flows)
    flow.log_prob(_x(32, seed=9).flatten(1))  # normflows' ActNorm: first-batch init
    return flow


def _normflows_glow(levels: int = 2, steps: int = 2):
    """normflows' multi-scale Glow recipe on 1x8x8 (unconditional base distributions)."""
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    c, h, w = SHAPE
    q0, flows, merges = [], [], []
    for i in range(levels):
        flows.append([nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), 8, init_zeros=False)
                      for _ in range(steps)] + [nf.flows.Squeeze()])
        k = levels if i == 0 else levels - i
        if i > 0:
            merges.append(nf.flows.Merge())
        channels = c * 2 ** (levels + 1) if i == 0 else c * 2 ** (levels - i)
        q0.append(nf.distributions.DiagGaussian((channels, h // 2 ** k, w // 2 ** k)))
    flow = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    flow.log_prob(_x(32, seed=9), None)  # ActNorm's first-batch init
    return flow


def test_normflows_single_scale_terms_per_transform():
    flow = _normflows_flat()
    y = _x().flatten(1)
    terms = _check(flow, y, flow.log_prob(y).detach(), "normflows")
    assert list(terms) == ["log_pz", "logdet_t0_maskedaffine", "logdet_t1_actnorm",
                           "logdet_t2_maskedaffine", "logdet_t3_actnorm"]
    # each term is that flow's own log|det| (flows[i], applied last to first)
    z, expected = y, {}
    for i in range(len(flow.flows) - 1, -1, -1):
        z, expected[i] = flow.flows[i].inverse(z)
    _close(terms["logdet_t2_maskedaffine"], expected[2].detach())
    _close(terms["log_pz"], flow.q0.log_prob(z).detach())


def test_normflows_multiscale_glow_writes_our_glow_columns():
    flow = _normflows_glow()
    x = _x()
    terms = _check(flow, x, flow.log_prob(x, None).detach(), "normflows")
    assert set(terms) == {f"log_pz_level{lv}" for lv in (0, 1)} | {
        f"logdet_level{lv}_{k}" for lv in (0, 1) for k in ("actnorm", "invconv", "coupling")}
    # level 0 is next to the data: its latent is the one split off first (2 x 4 x 4 here)
    z_top = flow.inverse_and_log_det(x)[0][0]  # normflows' level 0: the top
    _close(terms["log_pz_level1"], flow.q0[0].log_prob(z_top).detach())


def test_normflows_refusals():
    nf = pytest.importorskip("normflows")
    flow = _normflows_glow()
    flow.class_cond = True
    with pytest.raises(UserError, match="class_cond"):
        adapter_for(flow).terms(flow, _x())
    fresh = nf.NormalizingFlow(nf.distributions.DiagGaussian(D), [nf.flows.ActNorm(D)])
    with pytest.raises(UserError, match="ActNorm .*not initialised"):
        adapter_for(fresh).terms(fresh, _x().flatten(1))
    cond = nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(D), [nf.flows.Permute(D)])
    assert adapter_for(cond) is None


# --- nflows ----------------------------------------------------------------------------


def _nflows_flow():
    pytest.importorskip("nflows")
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import (
        ActNorm,
        AffineCouplingTransform,
        CompositeTransform,
        MaskedAffineAutoregressiveTransform,
        ReversePermutation,
    )

    torch.manual_seed(0)
    transforms = [ReversePermutation(D), MaskedAffineAutoregressiveTransform(D, 16),
                  AffineCouplingTransform(torch.arange(D) % 2,
                                          lambda n_in, n_out: ResidualNet(n_in, n_out, 16, num_blocks=1)),
                  ActNorm(D)]
    flow = Flow(CompositeTransform(transforms), StandardNormal([D]))
    flow.train()
    flow.log_prob(_x(32, seed=9).flatten(1))  # ActNorm initialises in training mode
    return flow.eval()


def test_nflows_terms_per_transform():
    flow = _nflows_flow()
    y = _x().flatten(1)
    terms = _check(flow, y, flow.log_prob(y).detach(), "nflows")
    assert list(terms) == ["log_pz", "logdet_t0_reversepermutation",
                           "logdet_t1_maskedaffineautoregressive", "logdet_t2_coupling",
                           "logdet_t3_actnorm"]
    z, expected = y, []
    for step in flow._transform._transforms:  # data -> noise, in the library's order
        z, logabsdet = step(z)
        expected.append(logabsdet)
    _close(terms["logdet_t1_maskedaffineautoregressive"], expected[1].detach())


def test_nflows_single_transform_is_one_logdet():
    pytest.importorskip("nflows")
    from nflows.flows import MaskedAutoregressiveFlow
    from nflows.flows.base import Flow

    maf = MaskedAutoregressiveFlow(D, 16, num_layers=1, num_blocks_per_layer=1).eval()
    one = Flow(maf._transform._transforms[1], maf._distribution)
    y = _x().flatten(1)
    terms = adapter_for(one).terms(one, y)
    assert list(terms) == ["log_pz", "logdet"]
    _close(sum_terms(terms), one.log_prob(y).detach())


# --- zuko ------------------------------------------------------------------------------


@pytest.mark.parametrize("flow_name, kind", [("NSF", "autoregressive"), ("MAF", "autoregressive"),
                                             ("RealNVP", "coupling")])
def test_zuko_terms_per_transform_on_images(flow_name, kind):
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = getattr(zuko.flows, flow_name)(features=D, transforms=2, hidden_features=(16,))
    x = _x()
    # images [B, 1, 8, 8] are flattened to the flow's 64 features
    terms = _check(flow, x, flow().log_prob(x.flatten(1)).detach(), "zuko")
    assert list(terms) == ["log_pz", f"logdet_t0_{kind}", f"logdet_t1_{kind}"]


def test_zuko_refusals():
    zuko = pytest.importorskip("zuko")
    conditional = zuko.flows.MAF(features=D, context=3, transforms=1)
    with pytest.raises(UserError, match="unconditional"):
        adapter_for(conditional).terms(conditional, _x())
    with pytest.raises(UserError, match="not flow"):
        wrap_module(zuko.flows.MAF(features=D)(), SHAPE)


def test_plain_modules_match_no_adapter():
    assert [a.name for a in ADAPTERS] == ["normflows", "nflows", "zuko"]
    assert adapter_for(Gaussian()) is None
    assert adapter_for(nn.Linear(2, 2)) is None


# --- the wrapper's rules -----------------------------------------------------------------


class Gaussian(nn.Module):
    """log_prob(y): a standard normal per pixel, whatever the input range."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(y)
        return (-0.5 * (y.float() ** 2 + math.log(2 * math.pi))).flatten(1).sum(1)


@pytest.mark.parametrize("input_range", list(INPUT_RANGES))
def test_input_range_adds_the_change_of_variables(input_range):
    a, b = INPUT_RANGES[input_range]
    module = Gaussian()
    x = _x()
    terms = wrap_module(module, SHAPE, input_range=input_range).log_prob_terms(x)
    _close(module.seen[-1], a * x + b)  # the module got y = a x + b
    expected = module.log_prob(a * x + b) + D * math.log(a)
    _close(sum_terms(terms), expected)
    assert set(terms) == ({"log_prob"} if a == 1 else {"log_prob", "logdet_input"})


def test_discrete_module_gets_pixels_and_the_offset_is_added():
    class Uniform(nn.Module):
        def log_prob(self, k):
            assert k.dtype == torch.uint8
            self.k = k
            return torch.full((len(k),), -D * math.log(256.0))

    module = Uniform()
    k = torch.randint(0, 256, (5, *SHAPE), dtype=torch.uint8)
    x = (k + torch.rand(k.shape)) / 256
    terms = wrap_module(module, SHAPE, discrete=True).log_prob_terms(x)
    assert torch.equal(module.k, k)
    assert set(terms) == {"log_prob", "discrete_offset"}
    _close(sum_terms(terms), torch.zeros(5))  # uniform P(k): log p(x) = 0, 8 bits/dim
    with pytest.raises(UserError, match="discrete"):
        wrap_module(module, SHAPE, discrete=True, input_range="-1,1")


def test_own_terms_win_and_bad_modules_are_refused():
    class Terms(Gaussian):
        def log_prob_terms(self, y):
            return {"a": y.flatten(1).sum(1), "b": torch.ones(len(y))}

    terms = wrap_module(Terms(), SHAPE).log_prob_terms(_x())
    assert set(terms) == {"a", "b"}

    class Wrong(nn.Module):
        def log_prob(self, y):
            return y.sum()

    with pytest.raises(UserError, match="one value per image"):
        wrap_module(Wrong(), SHAPE).log_prob_terms(_x())
    with pytest.raises(UserError, match="no log_prob"):
        wrap_module(nn.Linear(2, 2), SHAPE)
    with pytest.raises(UserError, match="input_range"):
        wrap_module(Gaussian(), SHAPE, input_range="0,2")


def test_adapter_logdets_total_to_logdet_without_misreading_levels():
    from ood_audit.analysis.decomposition import _member

    terms = ["log_pz", "logdet_t0_coupling", "logdet_t1000_actnorm", "logdet_input"]
    assert totals_for(terms) == {"logdet": ["logdet_t0_coupling", "logdet_t1000_actnorm"]}
    assert _member("logdet_t1000_actnorm", "logdet") is None  # not "level 0, kind actnorm"
    assert _member("logdet_level2_coupling", "logdet").groups() == ("2", "coupling")
    assert totals_for(["log_pz", "logdet"]) == {}  # one logdet term: nothing to total
