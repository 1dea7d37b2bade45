"""Glow (Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
NeurIPS 2018) as a :class:`~ood_audit.models.base.DensityModel`, with named per-level
terms so the log p(z) vs log-det decomposition of Nalisnick et al. (ICLR 2019, section 4)
is a column per term.

Architecture: for level ``i`` in ``0..L-1``: Squeeze; ``K`` steps of ActNorm ->
InvConv1x1 -> coupling; then a :class:`SplitPrior` (``i < L-1``) or the learned
:class:`TopPrior` (last level). ``coupling="additive"`` gives the paper's CV-Glow.

Checked against openai/glow (``model.py``, ``tfops.py``), layer by layer:

- as openai/glow: input ``x - 0.5`` of x = (k + u) / 256; the squeeze's channel order;
  ActNorm (bias, then scale; log-scale stored divided by 3, ``logscale_factor``; data
  init on 256 images to zero mean and unit variance); the coupling network ``f``
  (conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> zero-init conv3x3 with a
  ``exp(3 logs)`` scale; hidden convs without biases, ``N(0, 0.05)`` weights); the
  coupling (first half conditions the second; shift ``h[:, 0::2]``, scale
  ``sigmoid(h[:, 1::2] + 2)``); the split (first half kept; prior from a zero-init conv
  on it, mean ``h[:, 0::2]``, log-scale ``h[:, 1::2]``); the random orthogonal init of
  the 1x1 convolutions; Polyak averaging of the weights (``train.ema_decay``).

Deliberate departures, each with its reason:

- **LU-parameterised 1x1 convolution** (openai/glow's default is the plain W with a
  float64 log-determinant; the LU form is the paper's section 3.2 option and y0ast's
  default): log|det| in O(C), no determinant per step, the same function class.
- **Top prior with a mean and log-scale per position** (openai/glow: a zero-init conv of
  zeros, i.e. per channel plus a border term): a superset, so the priors of openai/glow,
  y0ast's port (per channel) and rosinality's (computed from padding) all convert
  exactly (:mod:`.glow_convert`); 2 x C x H x W parameters, 784 at the top of a 28x28
  Glow.
- **Edge channel off by default** (``edge_bias``; openai/glow has it on): 0.04 bits/dim
  better at the demo budget, within the spread over seeds (``benchmarks/README.md``),
  for an extra pass over the first hidden activation of every coupling; on for
  rosinality imports, whose "pad with 1" convs it holds.
- **Adam, not Adamax**, the optimiser the issue's budget and both PyTorch ports use.
- **Polyak averaging off by default** (``train.ema_decay``; openai/glow averages over an
  epoch): over a 2-epoch budget the average lags the improving weights (0.16 bits/dim
  worse at decay 0.99); it pays off in long runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..errors import UserError
from .flows.actnorm import ActNorm
from .flows.coupling import AdditiveCoupling, AffineCoupling
from .flows.invconv import InvConv1x1
from .flows.multiscale import MultiScaleFlow
from .flows.priors import SplitPrior, TopPrior

#: Coupling variants by config name; the config validates against these keys.
COUPLINGS: dict[str, type[AffineCoupling]] = {
    "affine": AffineCoupling,
    "additive": AdditiveCoupling,
}

#: The kinds of layer in one flow step, in application order; each is one term per level.
STEP_LAYERS: tuple[str, ...] = ("actnorm", "invconv", "coupling")


@dataclass
class GlowConfig:
    """Glow size: ``levels`` (L), ``steps`` per level (K), ``hidden`` coupling channels,
    ``coupling`` in :data:`COUPLINGS`. Defaults are Glow's image config (L=3, K=32, 512)."""

    levels: int = 3
    steps: int = 32
    hidden: int = 512
    coupling: str = "affine"
    #: openai/glow's edge channel in the 3x3 convolutions (``tfops.add_edge_padding``)
    edge_bias: bool = False
    #: ActNorm log-scales are stored divided by this (openai/glow: 3; y0ast's port: 1)
    actnorm_logscale: float = 3.0

    def __post_init__(self) -> None:
        if not (isinstance(self.actnorm_logscale, (int, float)) and self.actnorm_logscale > 0):
            raise ValueError(f"glow actnorm_logscale must be positive, got {self.actnorm_logscale!r}")
        for name in ("levels", "steps", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"glow {name} must be a positive integer, got {value!r}")
        if self.coupling not in COUPLINGS:
            raise ValueError(
                f"glow coupling must be one of {', '.join(sorted(COUPLINGS))}, "
                f"got {self.coupling!r}"
            )


#: Named sizes. "paper" is Glow's standard image config used by Nalisnick et al.
GLOW_PRESETS: dict[str, dict] = {
    "tiny": {"levels": 2, "steps": 2, "hidden": 16},
    "small": {"levels": 2, "steps": 8, "hidden": 64},
    "paper": {"levels": 3, "steps": 32, "hidden": 512},
}


def max_levels(height: int, width: int) -> int:
    """The largest L with H and W both divisible by 2**L."""
    levels = 0
    while height % 2 ** (levels + 1) == 0 and width % 2 ** (levels + 1) == 0:
        levels += 1
    return levels


def fit_levels(
    config: GlowConfig, input_shape: tuple[int, int, int]
) -> tuple[GlowConfig, str | None]:
    """Cap ``config.levels`` so every Squeeze sees even H and W; returns (config, note).

    Images are never padded: constant padding pixels are free for a flow to learn, which
    would make bits/dim incomparable with the paper. The note (one line) says what changed,
    or is None. Raises :class:`UserError` when not even one level fits (odd H or W).
    """
    _, height, width = input_shape
    supported = max_levels(height, width)
    if supported == 0:
        raise UserError(
            f"{height}x{width} input cannot be used with Glow: H and W must be even "
            f"(divisible by 2^levels); crop or resize the images"
        )
    if config.levels <= supported:
        return config, None
    note = (
        f"{height}x{width} input supports at most {supported} levels (H, W divisible by "
        f"2^L); using levels={supported} instead of {config.levels}"
    )
    return dataclasses.replace(config, levels=supported), note


class Glow(MultiScaleFlow):
    """Multi-scale Glow over x in [0, 1)^D (dequantized pixels), shape ``[B, C, H, W]``:
    the composite (:class:`~.flows.multiscale.MultiScaleFlow`) with Glow's steps
    (ActNorm -> 1x1 conv -> coupling, :data:`STEP_LAYERS`) and priors.

    log p(x) = sum_i log p(z_i) + sum of log-dets, in nats, as a density on [0, 1)^D;
    x is shifted by -0.5 first (a translation: no log-det). Its terms: for each level
    ``i``, ``log_pz_level{i}`` (split prior log p(z2 | z1), or the top prior at the last
    level), then ``logdet_level{i}_actnorm``, ``logdet_level{i}_invconv``,
    ``logdet_level{i}_coupling`` (each summed over the level's K steps; the coupling term
    is zeros[B] for additive coupling). Fast paths (:mod:`~ood_audit.models.fastpath`):
    :meth:`set_fast_path`.
    """

    input_offset = 0.5  # openai/glow scores x - 0.5

    def __init__(self, config: GlowConfig, input_shape: tuple[int, int, int]):
        super().__init__()
        channels, height, width = input_shape
        if height % 2**config.levels or width % 2**config.levels:
            raise UserError(
                f"{height}x{width} input does not support levels={config.levels} "
                f"(H, W must be divisible by 2^levels); use fit_levels or fewer levels"
            )
        self.config = config
        self.input_shape = (channels, height, width)
        coupling_cls = COUPLINGS[config.coupling]
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        c, h, w = channels, height, width
        for i in range(config.levels):
            c, h, w = c * 4, h // 2, w // 2
            self.levels.append(nn.ModuleList(
                nn.ModuleDict({  # the order of STEP_LAYERS
                    "actnorm": ActNorm(c, config.actnorm_logscale),
                    "invconv": InvConv1x1(c),
                    "coupling": coupling_cls(c, config.hidden, config.edge_bias,
                                             config.actnorm_logscale),
                })
                for _ in range(config.steps)
            ))
            if i < config.levels - 1:
                self.priors.append(SplitPrior(c, config.edge_bias))
                c = c // 2
            else:
                self.priors.append(TopPrior(c, h, w))

    def extra_metadata(self) -> dict[str, str]:
        return {"coupling": self.config.coupling, "levels": str(self.config.levels),
                **super().extra_metadata()}
