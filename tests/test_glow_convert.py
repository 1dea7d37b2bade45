"""Other Glows as ours: an ood-audit 0.1 checkpoint (arch 1) loads as the same function,
and the state dicts of y0ast/Glow-PyTorch and rosinality/glow-pytorch convert to the same
log p(x) per image (checked against clones of the ports where the environment names them:
``OOD_AUDIT_Y0AST_PORT`` and ``OOD_AUDIT_ROSINALITY_PORT``; skipped, visibly, otherwise)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ood_audit.checkpoint import FORMAT, load_checkpoint
from ood_audit.errors import UserError
from ood_audit.models.glow import Glow
from ood_audit.models.glow_convert import from_rosinality, from_y0ast

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
L, K, HIDDEN = 2, 2, 6


# ------------------------------------------------------------- arch 1 (ood-audit 0.1)
def _legacy_state(shape: tuple[int, int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the layout ood-audit 0.1 saved (nn.Conv2d with biases in the
    coupling network, ZeroConv2d holding its conv as ``.conv``, plain ActNorm logs)."""
    g = torch.Generator().manual_seed(seed)

    def r(*size, scale=0.1):
        return scale * torch.randn(*size, generator=g)

    state: dict[str, torch.Tensor] = {}
    c, h, w = shape
    for i in range(L):
        c, h, w = 4 * c, h // 2, w // 2
        ca = c // 2
        for k in range(K):
            p = f"levels.{i}.{k}."
            state |= {p + "actnorm.bias": r(1, c, 1, 1), p + "actnorm.logs": r(1, c, 1, 1),
                      p + "actnorm.initialized": torch.tensor(True)}
            q, _ = torch.linalg.qr(torch.randn(c, c, generator=g))
            perm, lower, upper = torch.linalg.lu(q)
            s = torch.diagonal(upper)
            state |= {p + "invconv.perm": perm, p + "invconv.sign_s": torch.sign(s),
                      p + "invconv.lower": lower + torch.tril(r(c, c), -1),
                      p + "invconv.upper": torch.triu(upper, 1), p + "invconv.log_s": torch.log(s.abs())}
            n = p + "coupling.nn."
            state |= {n + "0.weight": r(HIDDEN, ca, 3, 3), n + "0.bias": r(HIDDEN),
                      n + "2.weight": r(HIDDEN, HIDDEN, 1, 1), n + "2.bias": r(HIDDEN),
                      n + "4.conv.weight": r(2 * (c - ca), HIDDEN, 3, 3), n + "4.conv.bias": r(2 * (c - ca)),
                      n + "4.logs": r(1, 2 * (c - ca), 1, 1)}
        if i < L - 1:
            state |= {f"priors.{i}.conv.conv.weight": r(c, c // 2, 3, 3), f"priors.{i}.conv.conv.bias": r(c),
                      f"priors.{i}.conv.logs": r(1, c, 1, 1)}
            c //= 2
        else:
            state |= {f"priors.{i}.mean": r(1, c, h, w), f"priors.{i}.logs": r(1, c, h, w)}
    return state


def _legacy_log_px(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """log p(x) of an ood-audit 0.1 Glow, written out from its documented layers (not
    from today's modules): a second implementation to hold the upgraded model against."""
    def gauss(z, mean, logs):
        return (-0.5 * (math.log(2 * math.pi) + 2 * logs + (z - mean) ** 2 * torch.exp(-2 * logs))).flatten(1).sum(1)

    z, total = x - 0.5, torch.zeros(len(x), dtype=x.dtype)
    for i in range(L):
        b, c, h, w = z.shape
        z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        c, hw = 4 * c, (h // 2) * (w // 2)
        for k in range(K):
            p = f"levels.{i}.{k}."
            z = (z + sd[p + "actnorm.bias"]) * torch.exp(sd[p + "actnorm.logs"])
            total = total + hw * sd[p + "actnorm.logs"].sum()
            lower = torch.tril(sd[p + "invconv.lower"], -1) + torch.eye(c, dtype=x.dtype)
            upper = torch.triu(sd[p + "invconv.upper"], 1) + torch.diag(sd[p + "invconv.sign_s"]
                                                                        * torch.exp(sd[p + "invconv.log_s"]))
            z = F.conv2d(z, (sd[p + "invconv.perm"] @ lower @ upper)[:, :, None, None])
            total = total + hw * sd[p + "invconv.log_s"].sum()
            n, ca = p + "coupling.nn.", c // 2
            hid = F.relu(F.conv2d(z[:, :ca], sd[n + "0.weight"], sd[n + "0.bias"], padding=1))
            hid = F.relu(F.conv2d(hid, sd[n + "2.weight"], sd[n + "2.bias"]))
            out = F.conv2d(hid, sd[n + "4.conv.weight"], sd[n + "4.conv.bias"], padding=1)
            out = out * torch.exp(3 * sd[n + "4.logs"])
            log_scale = F.logsigmoid(out[:, 1::2] + 2.0)
            z = torch.cat([z[:, :ca], (z[:, ca:] + out[:, 0::2]) * torch.exp(log_scale)], 1)
            total = total + log_scale.flatten(1).sum(1)
        if i < L - 1:
            z1, z2 = z[:, : c // 2], z[:, c // 2:]
            hp = F.conv2d(z1, sd[f"priors.{i}.conv.conv.weight"], sd[f"priors.{i}.conv.conv.bias"], padding=1)
            hp = hp * torch.exp(3 * sd[f"priors.{i}.conv.logs"])
            total, z = total + gauss(z2, hp[:, 0::2], hp[:, 1::2]), z1
        else:
            total = total + gauss(z, sd[f"priors.{i}.mean"], sd[f"priors.{i}.logs"])
    return total


def test_an_arch1_checkpoint_loads_as_the_same_function(tmp_path):
    shape = (1, 8, 8)
    state = _legacy_state(shape)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={
        "format": FORMAT, "model": "glow", "input_shape": json.dumps(list(shape)), "epoch": "3",
        "model_config": json.dumps({"levels": L, "steps": K, "hidden": HIDDEN, "coupling": "affine"}),
        "run_config": "{}", "dataset": "x", "version": "0.1.0"})  # no "arch": written by 0.1
    model, info = load_checkpoint(path)
    assert info.model_config.actnorm_logscale == 1.0 and not info.model_config.edge_bias
    x = torch.rand(6, *shape, dtype=torch.float64)
    with torch.no_grad():
        got = model.double().log_prob(x)
    expected = _legacy_log_px({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-8)


def test_a_newer_arch_is_refused_in_one_line(tmp_path):
    shape = (1, 8, 8)
    path = tmp_path / "model.safetensors"
    save_file(_legacy_state(shape), str(path), metadata={
        "format": FORMAT, "model": "glow", "input_shape": json.dumps(list(shape)), "epoch": "1",
        "model_config": json.dumps({"levels": L, "steps": K, "hidden": HIDDEN}), "run_config": "{}",
        "arch": "99"})
    with pytest.raises(UserError, match="newer than this ood-audit"):
        load_checkpoint(path)


# --------------------------------------------------------------- refusals (no clone)
def test_y0ast_options_without_an_equivalent_are_refused_in_one_line():
    hp = {"K": 1, "L": 1, "hidden_channels": 4, "flow_coupling": "affine",
          "flow_permutation": "invconv", "LU_decomposed": True, "learn_top": True, "y_condition": False}
    with pytest.raises(UserError, match="shuffle cannot be imported"):
        from_y0ast({}, {**hp, "flow_permutation": "shuffle"}, (1, 4, 4))
    with pytest.raises(UserError, match="y_condition"):
        from_y0ast({}, {**hp, "y_condition": True}, (1, 4, 4))
    with pytest.raises(UserError, match="hparams has no 'hidden_channels'"):
        from_y0ast({}, {k: v for k, v in hp.items() if k != "hidden_channels"}, (1, 4, 4))
    with pytest.raises(UserError, match=r"no tensor 'flow\.layers\.1\.actnorm\.bias'"):
        from_y0ast({}, hp, (1, 4, 4))
    with pytest.raises(UserError, match="divisible by 4"):
        from_y0ast({}, {**hp, "L": 2}, (1, 6, 6))


def test_rosinality_negative_actnorm_scale_is_refused():
    state = {"blocks.0.flows.0.coupling.net.0.weight": torch.zeros(4, 2, 3, 3),
             "blocks.0.flows.0.actnorm.loc": torch.zeros(1, 4, 1, 1),
             "blocks.0.flows.0.actnorm.scale": -torch.ones(1, 4, 1, 1)}
    with pytest.raises(UserError, match="non-positive"):
        from_rosinality(state, n_flow=1, n_block=1, affine=True, lu=True, input_shape=(1, 4, 4))
    with pytest.raises(UserError, match="not a rosinality"):
        from_rosinality({}, n_flow=1, n_block=1, affine=True, lu=True, input_shape=(1, 4, 4))


# ----------------------------------------------------------- parity with the ports
def _port_module(env: str, name: str):
    clone = os.environ.get(env)
    if not clone:
        pytest.skip(f"{env} names no clone of the {name} port")
    spec = importlib.util.spec_from_file_location("_bench_reference_ports", BENCH / "reference_ports.py")
    ports = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, ports)
    spec.loader.exec_module(ports)
    return ports.load_model_module(name, Path(clone))


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> None:
    """Off the init (zero convs are trivial), as trained weights would be."""
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))


def _images(shape, n=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (n, *shape), generator=g) + torch.rand(n, *shape, generator=g)) / 256


def _close(ours_cfg, ours_state, shape, x, reference):
    model = Glow(ours_cfg, shape)
    model.load_state_dict(ours_state)  # strict: every tensor of our Glow was filled
    model.eval()
    with torch.no_grad():
        got = model.log_prob(x).double()
    rel = ((got - reference.double()).abs() / reference.double().abs()).max()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 8, 8)])
@pytest.mark.parametrize("permutation,lu,coupling,learn_top", [
    ("invconv", True, "affine", True), ("invconv", False, "affine", False),
    ("reverse", True, "additive", True)])
def test_y0ast_state_dict_gives_the_ports_log_px(shape, permutation, lu, coupling, learn_top):
    m = _port_module("OOD_AUDIT_Y0AST_PORT", "y0ast")
    c, h, w = shape
    torch.manual_seed(0)
    net = m.Glow((h, w, c), HIDDEN, K, L, 1.0, permutation, coupling, lu, 10, learn_top, False)
    net.train()
    with torch.no_grad():
        net.flow(torch.rand(16, *shape) - 0.5, logdet=torch.zeros(16))  # ActNorm init
    _perturb(net)
    net.eval()
    x = _images(shape)
    with torch.no_grad():  # the port's forward without the noise it adds itself
        z, objective = net.flow(x - 0.5, logdet=torch.zeros(len(x)))
        mean, logs = net.prior(x)
        reference = objective + m.gaussian_likelihood(mean, logs, z)
    hparams = {"K": K, "L": L, "hidden_channels": HIDDEN, "flow_coupling": coupling,
               "flow_permutation": permutation, "LU_decomposed": lu, "learn_top": learn_top,
               "y_condition": False}
    _close(*from_y0ast(net.state_dict(), hparams, shape), shape, x, reference)


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 8, 8)])
@pytest.mark.parametrize("affine,lu", [(True, True), (True, False), (False, True), (False, False)])
def test_rosinality_state_dict_gives_the_ports_log_px(shape, affine, lu):
    m = _port_module("OOD_AUDIT_ROSINALITY_PORT", "rosinality")
    m.AffineCoupling.__init__.__defaults__ = (HIDDEN, True)  # filter_size, as our hidden
    torch.manual_seed(0)
    net = m.Glow(shape[0], K, L, affine=affine, conv_lu=lu)
    with torch.no_grad():
        net(torch.rand(16, *shape) - 0.5)  # ActNorm init
    _perturb(net)
    x = _images(shape)
    with torch.no_grad():
        log_p, logdet, _ = net(x - 0.5)
    cfg, state = from_rosinality(net.state_dict(), n_flow=K, n_block=L, affine=affine, lu=lu,
                                 input_shape=shape)
    _close(cfg, state, shape, x, log_p + logdet)
