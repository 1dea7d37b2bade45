"""A plain ``torch.nn.Module`` as a :class:`~ood_audit.models.base.DensityModel`: the
rules of issue 14's ``ood-audit import python``, for the Python API.

:func:`wrap_module` is the one place these rules are written on this side (the CLI's
``import python`` states the same rules; the two are to become one):

- **Input range** (``input_range``, one of :data:`INPUT_RANGES`): the module takes
  y = a x + b for our dequantized x in [0, 1)^D, with ``"lo,hi"`` meaning
  y = lo + (hi - lo) x (``"0,255"``: y = 255 x). The change of variables adds D log|a| to
  log p(x), written as the term ``logdet_input`` (only when a != 1), so bits/dim stay
  comparable with every other model.
- **Discrete** (``discrete=True``): ``log_prob`` takes the uint8 pixels k = floor(256 x)
  and returns log P(k); log p(x) = log P(k) + D log 256, the offset written as the term
  ``discrete_offset`` (Nalisnick et al. 2019, docs/paper.md: the density of the
  dequantized image). The input range does not apply.
- **Terms**: the module's own ``log_prob_terms(y)`` if it has one; else, when the module
  is a normflows / nflows / zuko flow, its adapter's terms (``log_pz``,
  ``logdet_t{i}_{kind}``, ...; :mod:`ood_audit.models.adapters`); else one term
  ``log_prob``, the module's ``log_prob(y)``. Each must be ``[B]``.

The module gets y of the images' shape ``[B, C, H, W]`` (a zuko flow over C*H*W features
is flattened by its adapter).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn

from ..data.preprocess import LOG_N_BINS
from ..errors import UserError
from ..models.adapters import adapter_for
from ..models.base import DensityModel
from ..models.discretized import pixels_from_unit

#: ``input_range`` -> (a, b) of y = a x + b.
INPUT_RANGES: dict[str, tuple[float, float]] = {
    "0,1": (1.0, 0.0),
    "-0.5,0.5": (1.0, -0.5),
    "-1,1": (2.0, -1.0),
    "0,255": (255.0, 0.0),
}
#: Terms the wrapper adds to the module's.
INPUT_TERM, DISCRETE_TERM, PLAIN_TERM = "logdet_input", "discrete_offset", "log_prob"


class WrappedModule(DensityModel):
    """``module`` as a density over x in [0, 1)^D of shape ``input_shape``; see the
    module docstring for the rules. Build it with :func:`wrap_module`."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, int, int], *,
                 input_range: str = "0,1", discrete: bool = False):
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise UserError(f"input_range {input_range!r}: choose one of {', '.join(INPUT_RANGES)}")
        if discrete and input_range != "0,1":
            raise UserError("discrete=True: log_prob takes the uint8 pixels, so no input_range "
                            f"applies (got {input_range!r}); leave it at '0,1'")
        self.module = module
        self.input_shape = tuple(int(n) for n in input_shape)
        self.input_range, self.discrete = input_range, bool(discrete)
        self.adapter = adapter_for(module)
        own = callable(getattr(module, "log_prob_terms", None))
        if not own and self.adapter is None and not callable(getattr(module, "log_prob", None)):
            raise UserError(f"{type(module).__name__} has no log_prob(x) (nor log_prob_terms), "
                            "and is no normflows, nflows or zuko flow: nothing to score")
        self.source = "log_prob_terms" if own else (self.adapter.name if self.adapter else "log_prob")

    @property
    def family(self) -> str:
        """How the scores' metadata names the model: the flow library whose adapter gives
        the terms, else ``python``."""
        return self.source if self.source not in ("log_prob_terms", "log_prob") else "python"

    def log_prob_terms(self, x: Tensor) -> dict[str, Tensor]:
        n_dims, batch = math.prod(self.input_shape), x.shape[0]
        a, b = INPUT_RANGES[self.input_range]
        if self.discrete:
            y = pixels_from_unit(x).to(torch.uint8)
        else:
            y = x if (a, b) == (1.0, 0.0) else x * a + b
        terms = dict(self._module_terms(y))
        for name, value in terms.items():
            if not isinstance(value, Tensor) or tuple(value.shape) != (batch,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise UserError(f"{type(self.module).__name__}: term {name} has shape {shape} "
                                f"for a batch of {batch}; log_prob must give one value per image")
        if self.discrete:
            terms[DISCRETE_TERM] = x.new_full((batch,), n_dims * LOG_N_BINS)
        elif a != 1.0:  # the change of variables x -> a x + b
            terms[INPUT_TERM] = x.new_full((batch,), n_dims * math.log(abs(a)))
        return terms

    def _module_terms(self, y: Tensor) -> dict[str, Tensor]:
        if self.source == "log_prob_terms":
            return self.module.log_prob_terms(y)
        if self.adapter is not None:
            return self.adapter.terms(self.module, y)
        return {PLAIN_TERM: self.module.log_prob(y)}

    def extra_metadata(self) -> dict[str, str]:
        return {"class": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
                "terms_from": self.source, "input_range": self.input_range,
                "discrete": str(self.discrete).lower()}


def wrap_module(module: nn.Module, input_shape: tuple[int, int, int], *,
                input_range: str = "0,1", discrete: bool = False) -> WrappedModule:
    """``module`` (any ``nn.Module`` with ``log_prob(y) -> [B]``, or a normflows / nflows /
    zuko flow) as a DensityModel over images of ``input_shape`` (C, H, W)."""
    if not isinstance(module, nn.Module):
        hint = (" (a zuko flow: pass the flow module, not flow())"
                if isinstance(module, torch.distributions.Distribution) else "")
        raise UserError(f"expected a torch.nn.Module, got {type(module).__name__}{hint}")
    return WrappedModule(module, input_shape, input_range=input_range, discrete=discrete)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): the
    ``checkpoint_sha256`` of a model scored from memory."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
