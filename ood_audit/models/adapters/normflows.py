"""normflows (Stimper et al. 2023, "normflows: A PyTorch Package for Normalizing Flows",
JOSS): ``NormalizingFlow`` and ``MultiscaleFlow``.

Recognised: an instance of ``normflows.NormalizingFlow`` (its conditional subclass is
not: it needs a context) or of ``normflows.MultiscaleFlow``. Both map data to latent
with each flow's ``inverse``, as the library's own ``log_prob`` does.

Terms, in nats, for y in the flow's own input space:

- ``NormalizingFlow``: ``log_pz`` (``q0.log_prob(z)``) and ``logdet_t{i}_{kind}``, the
  log|det| of ``flows[i]`` (the library's index: ``flows[0]`` sits next to the base
  distribution, ``log_prob`` applies ``flows[-1]`` first), e.g. ``logdet_t3_glowblock``.
- ``MultiscaleFlow`` (class_cond=False): our Glow's columns, so ``decompose`` splits it
  per level and layer kind as it does our Glow. Level ``l = L-1-i`` for the library's
  level ``i`` (level 0 is next to the data, the last one is the top prior, as in our
  Glow): ``log_pz_level{l}`` (``q0[i].log_prob``) and ``logdet_level{l}_{kind}``, the
  log|det| of level i's flows summed by kind. A ``GlowBlock`` counts as its three layers
  (``coupling``, ``invconv``, ``actnorm``); the initial ``transform``, if any, is level 0.

A log-det the library returns as the number 0 (``Squeeze``, ``Merge``) adds no term.
A class-conditional ``MultiscaleFlow`` and a flow whose ``ActNorm`` has not seen its
first batch (normflows initialises it from the first batch it is given, which would be
our scoring batch) are refused with a UserError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import UserError
from .common import check_batch, from_library, is_zero_number, kind_of, per_sample

if TYPE_CHECKING:
    from torch import Tensor, nn

LIBRARY = "normflows"


def matches(module: nn.Module) -> bool:
    if not from_library(module, LIBRARY):
        return False
    import normflows as nf

    if isinstance(module, nf.ConditionalNormalizingFlow):
        return False
    return isinstance(module, (nf.NormalizingFlow, nf.MultiscaleFlow))


def terms(module: nn.Module, y: Tensor) -> dict[str, Tensor]:
    import normflows as nf

    _check_actnorm(module)
    if isinstance(module, nf.MultiscaleFlow):
        out = _multiscale_terms(module, y)
    else:
        out = _single_scale_terms(module, y)
    return check_batch(out, y.shape[0], LIBRARY)


def _single_scale_terms(flow, y: Tensor) -> dict[str, Tensor]:
    logdets: dict[str, Tensor] = {}
    z = y
    for i in range(len(flow.flows) - 1, -1, -1):
        z, log_det = flow.flows[i].inverse(z)
        if not is_zero_number(log_det):
            logdets[f"logdet_t{i}_{kind_of(flow.flows[i])}"] = per_sample(log_det, y)
    ordered = dict(sorted(logdets.items(), key=lambda kv: int(kv[0].split("_")[1][1:])))
    return {"log_pz": per_sample(flow.q0.log_prob(z), y), **ordered}


def _multiscale_terms(flow, y: Tensor) -> dict[str, Tensor]:
    if flow.class_cond:
        raise UserError("normflows MultiscaleFlow with class_cond=True: its log p(x) needs the "
                        "class of x, which OOD images do not have; build it with "
                        "class_cond=False and unconditional base distributions")
    n_levels = len(flow.q0)
    out: dict[str, Tensor] = {}

    def add(level: int, layer, log_det) -> None:
        if is_zero_number(log_det):
            return
        name = f"logdet_level{level}_{kind_of(layer)}"
        value = per_sample(log_det, y)
        out[name] = out[name] + value if name in out else value

    z = y
    if flow.transform is not None:
        z, log_det = flow.transform.inverse(z)
        add(0, flow.transform, log_det)
    for i in range(n_levels - 1, -1, -1):
        level = n_levels - 1 - i
        for j in range(len(flow.flows[i]) - 1, -1, -1):
            for layer in reversed(_layers(flow.flows[i][j])):
                z, log_det = layer.inverse(z)
                add(level, layer, log_det)
        if i > 0:
            [z, z_level], log_det = flow.merges[i - 1].inverse(z)
            add(level, flow.merges[i - 1], log_det)
        else:
            z_level = z
        out[f"log_pz_level{level}"] = per_sample(flow.q0[i].log_prob(z_level), y)
    pz = {k: v for k, v in out.items() if k.startswith("log_pz")}
    return {**pz, **{k: v for k, v in out.items() if k not in pz}}


def _layers(step) -> list:
    """A GlowBlock's own layers (applied in this order by its ``forward``), else [step]."""
    import normflows as nf

    return list(step.flows) if isinstance(step, nf.flows.GlowBlock) else [step]


def _check_actnorm(module: nn.Module) -> None:
    import normflows as nf

    for name, layer in module.named_modules():
        if isinstance(layer, nf.flows.ActNorm) and not bool(layer.data_dep_init_done > 0):
            raise UserError(f"normflows ActNorm {name or 'layer'} is not initialised: normflows "
                            "sets it from the first batch it sees, which would be a scoring "
                            "batch; train the flow (or call flow.log_prob on a batch of training "
                            "images) before auditing it")
