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
- **Edge channel off by default** (``edge_bias``; openai/glow has it on): measured no
  better at our budgets (``benchmarks/README.md``) and it costs an extra pass over the
  first hidden activation; on for rosinality imports, whose "pad with 1" convs it holds.
- **Adam, not Adamax**, the optimiser the issue's budget and both PyTorch ports use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import DensityModel
from .fastpath import (
    FAST_PATHS,
    FastPath,
    activation_memory_format,
    apply_memory_format,
    enable_tf32,
    require_compile,
    tune_cpu_allocator,
)
from .flows.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    InvConv1x1,
    SplitPrior,
    Squeeze,
    TopPrior,
)

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


class Glow(DensityModel):
    """Multi-scale Glow over x in [0, 1)^D (dequantized pixels), shape ``[B, C, H, W]``.

    log p(x) = sum_i log p(z_i) + sum of log-dets, in nats, as a density on [0, 1)^D;
    x is shifted by -0.5 first (a translation: no log-det). See :meth:`log_prob_terms`.
    Fast paths (:mod:`~ood_audit.models.fastpath`): :meth:`set_fast_path`.
    """

    #: torch.compile backend of the ``compile`` fast path (tests use a quick one)
    compile_backend: str = "inductor"

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
        self.squeeze = Squeeze()
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        c, h, w = channels, height, width
        for i in range(config.levels):
            c, h, w = c * 4, h // 2, w // 2
            self.levels.append(nn.ModuleList(
                nn.ModuleDict({
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
        self.fast = FastPath()
        self._compiled: Callable | None = None

    def set_fast_path(self, name: str, value: bool) -> None:
        """Turn a fast path of :data:`~ood_audit.models.fastpath.FAST_PATHS` on or off
        (``naive`` too: the benchmark's uncached, library-conv baseline). Call it after moving the
        model to its device: ``compile`` checks for a compiler, ``tf32`` needs CUDA."""
        device = next(self.parameters()).device.type
        if value and name == "compile":
            require_compile(device)
        if value and name == "tf32" and not enable_tf32(device):
            raise UserError(f"--tf32 applies to CUDA devices only; this model runs on {device}")
        self.fast.set(name, value)
        self._compiled = None
        for module in self.modules():
            if isinstance(module, AffineCoupling):
                module.bf16 = self.fast.bf16
            if isinstance(module, InvConv1x1):
                module.float64 = self.fast.tf32  # TF32 would lower this conv's precision
            module.naive = self.fast.naive

    def activation_memory_format(self) -> torch.memory_format:
        """Channels-last on CPU and with the ``channels_last`` fast path (see
        :func:`~ood_audit.models.fastpath.activation_memory_format`)."""
        return activation_memory_format(next(self.parameters()).device.type, self.fast)

    def train(self, mode: bool = True) -> Glow:
        """Switch mode and drop every scoring cache (:func:`~ood_audit.models.flows.layers.cached`).

        The caches check parameter version counters, but fused optimizers (``Adam(fused=True)``,
        the trainer's) write parameters without bumping them; every trainer switches to train
        mode to step and back to eval to evaluate, so clearing here keeps evaluation exact.
        """
        for module in self.modules():
            module.__dict__.pop("_cache", None)
        return super().train(mode)

    def set_score_option(self, name: str, value: object) -> None:
        """The fast paths (:data:`~ood_audit.models.fastpath.FAST_PATHS`, bool values)."""
        if name in FAST_PATHS or name == "naive":
            self.set_fast_path(name, value)
        else:
            super().set_score_option(name, value)

    def _forward(self, x: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """:meth:`_run`, compiled when the ``compile`` fast path is on."""
        if x.device.type == "cpu":
            tune_cpu_allocator()
        if not self.fast.compile:
            return self._run(x)
        if self._compiled is None:
            # fullgraph: a graph break in the hot loop is an error, not a silent slowdown.
            # Static shapes; a short last batch is padded below instead of recompiled.
            self._compiled = torch.compile(self._run, fullgraph=True, dynamic=False,
                                           backend=self.compile_backend)
            self._compiled_batch = x.shape[0]
        n, full = x.shape[0], self._compiled_batch
        if n < full and not torch.is_grad_enabled():
            # Images are independent in a forward pass, so padding changes no row.
            pad = x[-1:].expand(full - n, *x.shape[1:])
            terms, latents = self._compiled(torch.cat([x, pad]))
            return {k: v[:n] for k, v in terms.items()}, [z[:n] for z in latents]
        return self._compiled(x)

    def _run(self, x: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Forward pass: (named terms, latents per level)."""
        terms: dict[str, Tensor] = {}
        latents: list[Tensor] = []
        z = x - 0.5
        last = len(self.levels) - 1
        for i, (steps, prior) in enumerate(zip(self.levels, self.priors, strict=True)):
            z, _ = self.squeeze(z)  # a permutation: log-det is exactly zero
            z = apply_memory_format(z, self.fast)  # the squeeze's copy is NCHW
            logdets: dict[str, Tensor] = {}
            for step in steps:
                for kind in STEP_LAYERS:
                    z, ld = step[kind](z)
                    logdets[kind] = logdets[kind] + ld if kind in logdets else ld
            if i < last:
                z, z2, log_pz = prior(z)
                latents.append(z2)
            else:
                log_pz = prior.log_prob(z)
                latents.append(z)
            # Each split's log p(z_i) stays its own term, never folded into the log-dets.
            terms[f"log_pz_level{i}"] = log_pz
            for kind in STEP_LAYERS:
                terms[f"logdet_level{i}_{kind}"] = logdets[kind]
        return terms, latents

    def log_prob_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per-sample terms, each ``[B]``, summing to log p(x) in nats. For each level
        ``i``: ``log_pz_level{i}`` (split prior log p(z2 | z1), or the top prior at the last
        level), then ``logdet_level{i}_actnorm``, ``logdet_level{i}_invconv``,
        ``logdet_level{i}_coupling`` (each summed over the level's K steps; the coupling
        term is zeros[B] for additive coupling)."""
        return self._forward(x)[0]

    def encode(self, x: Tensor) -> list[Tensor]:
        """Latents: the factored-out ``z2`` of each split (level 0 first), then the top z."""
        return self._forward(x)[1]

    def _reverse(self, z: Tensor, z2_for: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Invert from the top latent; ``z2_for(level, z1)`` supplies each split's z2."""
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                z = self.priors[i].inverse(z, z2_for(i, z))
            for step in reversed(self.levels[i]):
                for kind in reversed(STEP_LAYERS):
                    z, _ = step[kind].inverse(z)
            z, _ = self.squeeze.inverse(z)
        return z + 0.5

    def decode(self, zs: list[Tensor]) -> Tensor:
        """Exact inverse of :meth:`encode`: x in [0, 1) space."""
        if len(zs) != len(self.levels):
            raise ValueError(f"decode needs {len(self.levels)} latents, got {len(zs)}")
        return self._reverse(zs[-1], lambda i, z1: zs[i])

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` images (x space) with every prior's std scaled by ``temperature``."""
        z = self.priors[-1].sample(n, temperature, generator)
        return self._reverse(
            z, lambda i, z1: self.priors[i].sample_z2(z1, temperature, generator))

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """One forward pass so every ActNorm initialises on real data (Glow, section 3.1).

        ActNorm initialises lazily while its ``initialized`` buffer is 0; afterwards (and
        after loading a checkpoint) forward passes never re-initialise. Always eager: a
        compiled forward assumes initialised ActNorms.
        """
        if x.device.type == "cpu":
            tune_cpu_allocator()
        self._run(x)

    def extra_metadata(self) -> dict[str, str]:
        meta = {"coupling": self.config.coupling, "levels": str(self.config.levels)}
        if self.fast.describe() != "exact":  # absent: the exact path
            meta["fast_path"] = self.fast.describe()
        return meta
