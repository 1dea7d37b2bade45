"""A multi-scale flow as a composite: levels of flow steps, each level ending in a prior,
and the named per-level terms of log p(x) for free.

For level ``i``: a squeeze, then each step's layers in order (each a
:class:`~.base.FlowLayer`: ``z, logabsdet = layer(z)``), then the level's
:class:`~.priors.Prior` hands part of ``z`` out of the flow with its log-density. The
composite sums the log-dets of the layers of one kind over the level's steps and hands
back one named term per (level, kind) and per prior:

    log p(x) = sum_i log_pz_level{i} + sum_{i, kind} logdet_level{i}_{kind}

The speed measures are applied here, outside the layers' maths: the memory format of the
activations, whether scoring caches are used (:mod:`.cache`), the CPU allocator setting,
torch.compile; the layers' own precision knobs are set by
:func:`ood_audit.models.fastpath.apply_to_layers`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...errors import UserError
from ..base import DensityModel
from ..fastpath import (
    FAST_PATHS,
    FastPath,
    activation_memory_format,
    apply_memory_format,
    apply_to_layers,
    enable_tf32,
    require_compile,
    tune_cpu_allocator,
)
from .cache import caching, clear_caches
from .squeeze import Squeeze


class MultiScaleFlow(DensityModel):
    """A density over x in [0, 1)^D, shape ``[B, C, H, W]``, through a multi-scale flow.

    A subclass builds, in ``__init__`` after this one's: ``self.levels``, one
    ``nn.ModuleList`` of steps per level, each step an ``nn.ModuleDict`` from a layer
    kind to its flow layer (applied in insertion order); ``self.priors``, one prior per
    level; ``self.input_shape``. ``input_offset`` is subtracted from x first (a
    translation: no log-det).
    """

    input_offset: float = 0.0
    #: torch.compile backend of the ``compile`` fast path (tests use a quick one)
    compile_backend: str = "inductor"

    def __init__(self) -> None:
        super().__init__()
        self.squeeze = Squeeze()
        self.fast = FastPath()
        self._compiled: Callable | None = None

    # ------------------------------------------------------------ the maths
    def _run(self, x: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Forward pass: (named terms, latents handed out per level)."""
        terms: dict[str, Tensor] = {}
        latents: list[Tensor] = []
        z = x - self.input_offset
        for i, (steps, prior) in enumerate(zip(self.levels, self.priors, strict=True)):
            z, _ = self.squeeze(z)  # a permutation: log-det is exactly zero
            z = apply_memory_format(z, self.fast)  # the squeeze's copy is NCHW
            logdets: dict[str, Tensor] = {}
            for step in steps:
                for kind, layer in step.items():
                    z, ld = layer(z)
                    logdets[kind] = logdets[kind] + ld if kind in logdets else ld
            z, z_out, log_pz = prior(z)
            latents.append(z_out)
            terms[f"log_pz_level{i}"] = log_pz
            for kind, ld in logdets.items():
                terms[f"logdet_level{i}_{kind}"] = ld
        return terms, latents

    def _reverse(self, draw: Callable[[int, Tensor | None], Tensor]) -> Tensor:
        """Invert from the top; ``draw(level, z_on)`` supplies the latent each level handed
        out (given what went on from it; None at the top)."""
        z = None
        with caching(not self.fast.naive):
            for i in reversed(range(len(self.levels))):
                z = self.priors[i].inverse(z, draw(i, z))
                for step in reversed(self.levels[i]):
                    for layer in reversed(list(step.values())):
                        z, _ = layer.inverse(z)
                z, _ = self.squeeze.inverse(z)
        return z + self.input_offset

    def log_prob_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per-sample terms, each ``[B]``, summing to log p(x) in nats: for each level
        ``i``, ``log_pz_level{i}`` (the prior's log p(z_i | what went on), or the top
        prior's at the last level), then ``logdet_level{i}_{kind}`` for each kind of layer
        in its steps, summed over the steps."""
        return self._forward(x)[0]

    def encode(self, x: Tensor) -> list[Tensor]:
        """The latents each level hands out, level 0 first (the top's last)."""
        return self._forward(x)[1]

    def decode(self, zs: list[Tensor]) -> Tensor:
        """Exact inverse of :meth:`encode`: x in [0, 1) space."""
        if len(zs) != len(self.levels):
            raise ValueError(f"decode needs {len(self.levels)} latents, got {len(zs)}")
        return self._reverse(lambda i, z_on: zs[i])

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` images (x space) with every prior's std scaled by ``temperature``."""
        return self._reverse(lambda i, z_on: self.priors[i].draw(z_on, n, temperature, generator))

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """One forward pass so every ActNorm initialises on real data (Glow, section 3.1).

        ActNorm initialises lazily while its ``initialized`` buffer is 0; afterwards (and
        after loading a checkpoint) forward passes never re-initialise. Always eager: a
        compiled forward assumes initialised ActNorms.
        """
        if x.device.type == "cpu":
            tune_cpu_allocator()
        with caching(not self.fast.naive):
            self._run(x)

    # ------------------------------------------------------------ speed, from outside
    def _forward(self, x: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """:meth:`_run` with the fast paths: caches, allocator, torch.compile."""
        if x.device.type == "cpu":
            tune_cpu_allocator()
        with caching(not self.fast.naive):
            if not self.fast.compile:
                return self._run(x)
            return self._run_compiled(x)

    def _run_compiled(self, x: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
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

    def set_fast_path(self, name: str, value: bool) -> None:
        """Turn a fast path of :data:`~ood_audit.models.fastpath.FAST_PATHS` on or off
        (``naive`` too: the benchmark's uncached, library-conv baseline). Call it after
        moving the model to its device: ``compile`` checks for a compiler, ``tf32`` needs
        CUDA."""
        device = next(self.parameters()).device.type
        if value and name == "compile":
            require_compile(device)
        if value and name == "tf32" and not enable_tf32(device):
            raise UserError(f"--tf32 applies to CUDA devices only; this model runs on {device}")
        self.fast.set(name, value)
        self._compiled = None
        apply_to_layers(self, self.fast)

    def set_score_option(self, name: str, value: object) -> None:
        """The fast paths (:data:`~ood_audit.models.fastpath.FAST_PATHS`, bool values)."""
        if name in FAST_PATHS or name == "naive":
            self.set_fast_path(name, value)
        else:
            super().set_score_option(name, value)

    def activation_memory_format(self) -> torch.memory_format:
        """Channels-last on CPU and with the ``channels_last`` fast path (see
        :func:`~ood_audit.models.fastpath.activation_memory_format`)."""
        return activation_memory_format(next(self.parameters()).device.type, self.fast)

    def train(self, mode: bool = True) -> MultiScaleFlow:
        """Switch mode and drop every scoring cache (:mod:`.cache`).

        The caches check parameter version counters, but fused optimizers (``Adam(fused=True)``,
        the trainer's) write parameters without bumping them; every trainer switches to train
        mode to step and back to eval to evaluate, so clearing here keeps evaluation exact.
        """
        clear_caches(self)
        return super().train(mode)

    def extra_metadata(self) -> dict[str, str]:
        """The fast paths in effect (absent: the exact path)."""
        return {} if self.fast.describe() == "exact" else {"fast_path": self.fast.describe()}

