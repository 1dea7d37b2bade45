"""State dicts of other Glow implementations, converted to :class:`~.glow.Glow`.

Each converter returns ``(GlowConfig, state_dict)`` such that our Glow, fed the same
dequantized image, gives the same log p(x) as the source model up to float rounding
(``tests/test_glow_convert.py`` checks it against clones of the ports, 1e-4 relative).
Our Glow can hold all three because its layers are supersets of theirs:

- the coupling network's conv + ActNorm (:class:`~.flows.convs.ActNormConv2d`) holds a
  plain conv with a bias (``logs = 0``);
- the edge channel (``edge_bias``) holds rosinality's "pad with 1" zero convs, whose
  border contribution is the edge channel's kernel summed over input channels;
- the top prior has a mean and log-scale per position, which holds a per-channel prior
  (y0ast) and a prior computed from constant padding (rosinality);
- the LU-parameterised 1x1 conv holds any invertible W (factored here in float64),
  including a fixed channel reversal.

Nothing here imports the ports' code: only their state dicts (tensors) are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .flows.convs import edge_mask
from .glow import Glow, GlowConfig

#: The architecture version this module converts to (checkpoint metadata ``model.arch``).
#: 1: ood-audit 0.1 (coupling convs with biases, no ActNorm, plain ActNorm log-scales).
#: 2: ood-audit 0.2 (openai/glow's coupling network with ActNorm, edge channel option).
GLOW_ARCH = 2


class Converter:
    """Fills our Glow's state dict from a source state dict, key by key, and checks that
    every key of both sides was used exactly once."""

    def __init__(self, source: dict[str, Tensor], config: GlowConfig,
                 input_shape: tuple[int, int, int], where: str):
        self.source = {k.removeprefix("module."): v for k, v in source.items()}  # DataParallel
        self.used: set[str] = set()
        self.where = where
        self.model = Glow(config, input_shape)
        self.target = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.filled: set[str] = set()

    def get(self, key: str) -> Tensor:
        if key not in self.source:
            raise UserError(f"{self.where}: no tensor {key!r} in the state dict; it does not "
                            "match the architecture given (check the flags or hparams)")
        self.used.add(key)
        return self.source[key].detach().to(torch.float64)

    def put(self, key: str, value: Tensor) -> None:
        expected = self.target[key]
        if value.numel() != expected.numel():
            raise UserError(f"{self.where}: {key} needs {tuple(expected.shape)}, the source "
                            f"gives {tuple(value.shape)}; check the architecture flags or hparams")
        self.target[key] = value.reshape(expected.shape).to(expected.dtype)
        self.filled.add(key)

    def finish(self) -> dict[str, Tensor]:
        unused = sorted(set(self.source) - self.used - IGNORED_SOURCE_KEYS)
        if unused:
            raise UserError(f"{self.where}: {len(unused)} tensor(s) of the state dict match "
                            f"nothing in the architecture given (first: {unused[0]!r}); check "
                            "the flags or hparams")
        for key in self.target:
            if key.endswith("initialized"):
                self.target[key] = torch.tensor(True)
                self.filled.add(key)
        missing = sorted(k for k in set(self.target) - self.filled if not k.endswith("initialized"))
        if missing:  # a converter bug, not the user's
            raise AssertionError(f"converter left {missing[:3]} unset")
        return self.target

    # -- layer helpers shared by the converters --------------------------------------
    def actnorm(self, dst: str, bias: Tensor, log_scale: Tensor, factor: float) -> None:
        self.put(f"{dst}.bias", bias)
        self.put(f"{dst}.logs", log_scale / factor)

    def lu(self, dst: str, weight: Tensor) -> None:
        """Any invertible ``[C, C]`` W as our LU factors, computed in float64."""
        p, lower, upper = torch.linalg.lu(weight.to(torch.float64))
        s = torch.diagonal(upper)
        if bool((s == 0).any()):
            raise UserError(f"{self.where}: a 1x1 convolution ({dst}) is singular")
        self.put(f"{dst}.perm", p)
        self.put(f"{dst}.sign_s", torch.sign(s))
        self.put(f"{dst}.lower", torch.tril(lower, -1))
        self.put(f"{dst}.upper", torch.triu(upper, 1))
        self.put(f"{dst}.log_s", torch.log(torch.abs(s)))

    def plain_conv(self, dst: str, weight: Tensor, bias: Tensor | None) -> None:
        """A conv with an optional bias into an :class:`ActNormConv2d` (``logs = 0``)."""
        self.put(f"{dst}.weight", weight)
        out = weight.shape[0]
        self.put(f"{dst}.bias", bias if bias is not None else torch.zeros(out))
        self.put(f"{dst}.logs", torch.zeros(out))
        if f"{dst}.edge_weight" in self.target:
            self.put(f"{dst}.edge_weight", torch.zeros(out, 1, *weight.shape[2:]))


#: Source keys with no meaning for log p(x) (y0ast's prior_h is a buffer of zeros).
IGNORED_SOURCE_KEYS = {"prior_h"}


def cross_order(n: int) -> Tensor:
    """Output-channel order that turns a "split" layout (first half a, second half b) into
    our "cross" one (a at even, b at odd positions): ``out[2j] = a_j, out[2j+1] = b_j``."""
    half = n // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()


# ------------------------------------------------------------------------- y0ast
def from_y0ast(state: dict[str, Tensor], hparams: dict[str, Any],
               input_shape: tuple[int, int, int], where: str = "y0ast checkpoint"
               ) -> tuple[GlowConfig, dict[str, Tensor]]:
    """y0ast/Glow-PyTorch (``model.py`` ``Glow``; ``hparams.json`` from its train.py).

    Supported: ``flow_coupling`` affine|additive, ``flow_permutation`` invconv (LU or
    not) | reverse, ``learn_top`` true|false. Refused in one line: ``shuffle`` (the port
    draws the permutation at construction and does not save it, so the state dict cannot
    say which it was) and ``y_condition`` (a class-conditional prior: OOD inputs have no
    class). The port's input is x - 0.5 with x our dequantized [0, 1) image, ours too.
    """
    def hp(name: str, default: Any = None) -> Any:
        if name not in hparams and default is None:
            raise UserError(f"{where}: hparams has no {name!r} (needs K, L, hidden_channels, "
                            "flow_coupling, flow_permutation, LU_decomposed, learn_top)")
        return hparams.get(name, default)

    if hp("y_condition", False):
        raise UserError(f"{where}: y_condition=true (a class-conditional prior) cannot be "
                        "audited: OOD images have no class; train without --y_condition")
    permutation = hp("flow_permutation")
    if permutation == "shuffle":
        raise UserError(f"{where}: flow_permutation=shuffle cannot be imported: the port "
                        "draws that permutation at random and does not save it in the state "
                        "dict; use a model trained with invconv or reverse")
    if permutation not in ("invconv", "reverse"):
        raise UserError(f"{where}: unknown flow_permutation {permutation!r}")
    coupling = hp("flow_coupling")
    if coupling not in ("affine", "additive"):
        raise UserError(f"{where}: unknown flow_coupling {coupling!r}")
    config = GlowConfig(levels=int(hp("L")), steps=int(hp("K")), hidden=int(hp("hidden_channels")),
                        coupling=coupling, edge_bias=False, actnorm_logscale=1.0)
    lu = bool(hp("LU_decomposed", True))
    cv = Converter(state, _fit(config, input_shape, where), input_shape, where)
    layer = 0
    for i in range(config.levels):
        layer += 1  # SqueezeLayer: no parameters
        for k in range(config.steps):
            src, dst = f"flow.layers.{layer}", f"levels.{i}.{k}"
            cv.actnorm(f"{dst}.actnorm", cv.get(f"{src}.actnorm.bias"),
                       cv.get(f"{src}.actnorm.logs"), 1.0)
            if permutation == "reverse":
                c = cv.target[f"{dst}.actnorm.bias"].shape[1]
                cv.lu(f"{dst}.invconv", torch.eye(c, dtype=torch.float64).flip(0))
            elif lu:
                inv = f"{src}.invconv"
                cv.put(f"{dst}.invconv.perm", cv.get(f"{inv}.p"))
                cv.put(f"{dst}.invconv.sign_s", cv.get(f"{inv}.sign_s"))
                cv.put(f"{dst}.invconv.lower", torch.tril(cv.get(f"{inv}.lower"), -1))
                cv.put(f"{dst}.invconv.upper", torch.triu(cv.get(f"{inv}.upper"), 1))
                cv.put(f"{dst}.invconv.log_s", cv.get(f"{inv}.log_s"))
            else:
                cv.lu(f"{dst}.invconv", cv.get(f"{src}.invconv.weight"))
            for j in (0, 2):  # Conv2d (no bias) -> ActNorm2d, as ours
                net, blk = f"{dst}.coupling.nn.{j}", f"{src}.block.{j}"
                cv.put(f"{net}.weight", cv.get(f"{blk}.conv.weight"))
                cv.actnorm(net, cv.get(f"{blk}.actnorm.bias"), cv.get(f"{blk}.actnorm.logs"), 1.0)
            _zero_conv(cv, f"{dst}.coupling.nn.4", f"{src}.block.4", "logs", order=None)
            layer += 1
        if i < config.levels - 1:  # Split2d: "cross" mean/logs, as ours
            _zero_conv(cv, f"priors.{i}.conv", f"flow.layers.{layer}.conv", "logs", order=None)
            layer += 1
    top = cv.target[f"priors.{config.levels - 1}.mean"]
    if hp("learn_top", True):
        # Conv2dZeros on zeros (zero padding): its bias, scaled; "split" into mean | logs.
        h = cv.get("learn_top_fn.conv.bias") * torch.exp(3.0 * cv.get("learn_top_fn.logs").flatten())
        cv.used.add("learn_top_fn.conv.weight")  # multiplies zeros only
        c = top.shape[1]
        cv.put(f"priors.{config.levels - 1}.mean", h[:c].view(1, c, 1, 1).expand_as(top))
        cv.put(f"priors.{config.levels - 1}.logs", h[c:].view(1, c, 1, 1).expand_as(top))
    else:
        cv.put(f"priors.{config.levels - 1}.mean", torch.zeros_like(top))
        cv.put(f"priors.{config.levels - 1}.logs", torch.zeros_like(top))
    return config, cv.finish()


def _zero_conv(cv: Converter, dst: str, src: str, logs_name: str, order: Tensor | None,
               pad_one: bool = False) -> None:
    """A zero-initialised 3x3 conv (weight, bias, ``exp(3 logs)`` scale) into our
    :class:`~.flows.convs.ZeroConv2d`, output channels reordered by ``order``; with
    ``pad_one`` (rosinality) the border of ones becomes the edge channel's kernel."""
    weight, bias = cv.get(f"{src}.conv.weight"), cv.get(f"{src}.conv.bias")
    logs = cv.get(f"{src}.{logs_name}").flatten()
    if order is not None:
        weight, bias, logs = weight[order], bias[order], logs[order]
    cv.put(f"{dst}.weight", weight)
    cv.put(f"{dst}.bias", bias)
    cv.put(f"{dst}.logs", logs)
    if pad_one:
        cv.put(f"{dst}.edge_weight", weight.sum(1, keepdim=True))
    elif f"{dst}.edge_weight" in cv.target:
        cv.put(f"{dst}.edge_weight", torch.zeros(weight.shape[0], 1, 3, 3))


def _fit(config: GlowConfig, input_shape: tuple[int, int, int], where: str) -> GlowConfig:
    _, h, w = input_shape
    if h % 2 ** config.levels or w % 2 ** config.levels:
        raise UserError(f"{where}: {config.levels} levels need H and W divisible by "
                        f"{2 ** config.levels}; the data's images are {h}x{w}")
    return config


# -------------------------------------------------------------------- rosinality
def from_rosinality(state: dict[str, Tensor], *, n_flow: int, n_block: int, affine: bool,
                    lu: bool, input_shape: tuple[int, int, int],
                    where: str = "rosinality checkpoint") -> tuple[GlowConfig, dict[str, Tensor]]:
    """rosinality/glow-pytorch (``model.py`` ``Glow(in_channel, n_flow, n_block, affine,
    conv_lu)``). Its input is x - 0.5, as ours. Its last block always uses the LU 1x1 conv
    (the port does not pass ``conv_lu`` to it); its ActNorm stores the scale itself
    (a negative one cannot be held by a log-scale and is refused)."""
    config = GlowConfig(levels=n_block, steps=n_flow, hidden=_rosinality_hidden(state, where),
                        coupling="affine" if affine else "additive", edge_bias=True,
                        actnorm_logscale=1.0)
    cv = Converter(state, _fit(config, input_shape, where), input_shape, where)
    for i in range(n_block):
        for k in range(n_flow):
            src, dst = f"blocks.{i}.flows.{k}", f"levels.{i}.{k}"
            scale = cv.get(f"{src}.actnorm.scale")
            if bool((scale <= 0).any()):
                raise UserError(f"{where}: {src}.actnorm.scale has non-positive entries, which "
                                "a log-scale ActNorm cannot hold")
            cv.actnorm(f"{dst}.actnorm", cv.get(f"{src}.actnorm.loc"), torch.log(scale), 1.0)
            cv.used.add(f"{src}.actnorm.initialized")
            inv = f"{src}.invconv"
            if lu or i == n_block - 1:
                cv.put(f"{dst}.invconv.perm", cv.get(f"{inv}.w_p"))
                cv.put(f"{dst}.invconv.sign_s", cv.get(f"{inv}.s_sign"))
                cv.put(f"{dst}.invconv.lower", torch.tril(cv.get(f"{inv}.w_l"), -1))
                cv.put(f"{dst}.invconv.upper", torch.triu(cv.get(f"{inv}.w_u"), 1))
                cv.put(f"{dst}.invconv.log_s", cv.get(f"{inv}.w_s"))
                cv.used.update(f"{inv}.{b}" for b in ("u_mask", "l_mask", "l_eye"))
            else:
                cv.lu(f"{dst}.invconv", cv.get(f"{inv}.weight").flatten(1))
            for j in (0, 2):  # plain convs with biases, zero padding
                cv.plain_conv(f"{dst}.coupling.nn.{j}", cv.get(f"{src}.coupling.net.{j}.weight"),
                              cv.get(f"{src}.coupling.net.{j}.bias"))
            # affine: the port's (log_s | t) halves -> our cross layout (shift even, raw
            # scale odd)
            order = None
            if affine:
                half = cv.target[f"{dst}.coupling.nn.4.bias"].numel() // 2
                order = torch.stack([torch.arange(half) + half, torch.arange(half)], 1).flatten()
            _zero_conv(cv, f"{dst}.coupling.nn.4", f"{src}.coupling.net.4", "scale", order, pad_one=True)
        prior = f"blocks.{i}.prior"
        if i < n_block - 1:  # split: (mean | log_sd) halves -> cross
            n = cv.target[f"priors.{i}.conv.bias"].numel()
            _zero_conv(cv, f"priors.{i}.conv", prior, "scale", cross_order(n), pad_one=True)
        else:  # the prior of zeros padded with ones: a constant per position
            top = cv.target[f"priors.{i}.mean"]
            c, h, w = top.shape[1:]
            weight, bias = cv.get(f"{prior}.conv.weight"), cv.get(f"{prior}.conv.bias")
            scale = torch.exp(3.0 * cv.get(f"{prior}.scale").flatten())
            ring = edge_mask(h, w, 1, weight)
            out = (F.conv2d(ring.expand(1, weight.shape[1], -1, -1), weight, bias)[0]
                   * scale.view(-1, 1, 1))
            cv.put(f"priors.{i}.mean", out[:c])
            cv.put(f"priors.{i}.logs", out[c:])
    return config, cv.finish()


def _rosinality_hidden(state: dict[str, Tensor], where: str) -> int:
    key = next((k for k in state if k.endswith("blocks.0.flows.0.coupling.net.0.weight")), None)
    if key is None:
        raise UserError(f"{where}: not a rosinality/glow-pytorch state dict (no "
                        "blocks.0.flows.0.coupling.net.0.weight)")
    return int(state[key].shape[0])


# ----------------------------------------------------------------- ood-audit 0.1
def upgrade_arch1(config: GlowConfig, state: dict[str, Tensor], input_shape: tuple[int, int, int],
                  where: str) -> tuple[GlowConfig, dict[str, Tensor]]:
    """An ood-audit 0.1 Glow checkpoint (coupling convs with biases and no ActNorm; plain
    ActNorm log-scales) as the same function in today's layers."""
    config = dataclasses.replace(config, edge_bias=False, actnorm_logscale=1.0)
    cv = Converter(state, config, input_shape, where)
    for key in cv.target:
        if key in cv.filled or key.endswith("initialized"):
            continue
        base, _, leaf = key.rpartition(".")
        if base.endswith((".coupling.nn.0", ".coupling.nn.2")):  # nn.Conv2d with a bias
            cv.plain_conv(base, cv.get(f"{base}.weight"), cv.get(f"{base}.bias"))
        elif base.endswith(".coupling.nn.4") or base.startswith("priors.") and base.endswith(".conv"):
            # ZeroConv2d held its conv as a submodule: conv.weight, conv.bias, logs
            cv.put(key, cv.get(f"{base}.conv.{leaf}" if leaf in ("weight", "bias") else key))
        else:
            cv.put(key, cv.get(key))
    cv.used.update(k for k in cv.source if k.endswith("initialized"))
    return config, cv.finish()
