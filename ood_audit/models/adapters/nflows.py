"""nflows (Durkan, Bekasov, Murray, Papamakarios 2020, bayesiains/nflows): ``Flow``.

Recognised: an instance of ``nflows.flows.base.Flow`` (``Flow(transform, distribution)``
and the library's ready-made flows, ``MaskedAutoregressiveFlow``, ``SimpleRealNVP``, which
subclass it) without a context: its embedding net must be the default identity.

Terms, in nats, for y in the flow's own input space (the transform maps data to noise):

- ``log_pz``: ``distribution.log_prob(noise)``;
- ``logdet_t{i}_{kind}``: the log|det| of ``transform._transforms[i]`` when the transform
  is a ``CompositeTransform`` (the library's index and order: ``_transforms[0]`` is
  applied to the data first), e.g. ``logdet_t1_reversepermutation``,
  ``logdet_t2_coupling`` (an ``AffineCouplingTransform``: kinds are named as our Glow
  names them where the layer is the same); a nested composite is one transform (kind
  ``composite``);
- otherwise one ``logdet``, the log|det| of the whole transform.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import UserError
from .common import check_batch, from_library, kind_of, per_sample

if TYPE_CHECKING:
    from torch import Tensor, nn

LIBRARY = "nflows"


def matches(module: nn.Module) -> bool:
    if not from_library(module, LIBRARY):
        return False
    from nflows.flows.base import Flow

    return isinstance(module, Flow)


def terms(module: nn.Module, y: Tensor) -> dict[str, Tensor]:
    from nflows.transforms.base import CompositeTransform
    from torch import nn as torch_nn

    if not isinstance(module._embedding_net, torch_nn.Identity):
        raise UserError(f"nflows {type(module).__name__} has an embedding net, so its density "
                        "needs a context; audit an unconditional flow")
    transform = module._transform
    logdets: dict[str, Tensor] = {}
    noise = y
    if isinstance(transform, CompositeTransform):
        for i, step in enumerate(transform._transforms):
            noise, log_det = step(noise, context=None)
            logdets[f"logdet_t{i}_{kind_of(step)}"] = per_sample(log_det, y)
    else:
        noise, log_det = transform(noise, context=None)
        logdets["logdet"] = per_sample(log_det, y)
    log_pz = module._distribution.log_prob(noise, context=None)
    return check_batch({"log_pz": per_sample(log_pz, y), **logdets}, y.shape[0], LIBRARY)
