"""zuko (Rozet et al., probabilists/zuko): a lazy ``Flow``.

How a zuko flow is recognised: zuko's flows (``zuko.flows.NSF``, ``MAF``, ``RealNVP``,
``NICE``, ... and ``zuko.flows.Flow(transform, base)`` itself) are *lazy*: the
``nn.Module`` holds the parameters and has no ``log_prob``; calling it, ``flow()``,
builds the distribution whose ``log_prob`` gives the density. The adapter recognises the
module, an instance of ``zuko.flows.Flow`` (``zuko.lazy.Flow``), and scores ``flow()`` (no context: a
conditional flow fails with a UserError, as does one whose features are not C*H*W). A
factory therefore returns the flow module, not ``flow()`` (a
``torch.distributions.Distribution``, not a module).

zuko's flows are over vectors: y of another shape with as many values as the flow's
event shape (images ``[B, C, H, W]`` for a flow of ``features=C*H*W``) is flattened to it.

Terms, in nats:

- ``log_pz``: ``flow().base.log_prob(z)``;
- ``logdet_t{i}_{kind}``: the log|det| of ``flow().transform.transforms[i]`` (the
  transform built from ``flow.transform.transforms[i]``; applied to the data in this
  order), e.g. ``logdet_t0_autoregressive`` for NSF / MAF, ``logdet_t1_coupling`` for
  RealNVP, summed over the event as zuko's ``ComposedTransform`` does;
- one ``logdet`` when the flow's transform is not a composition.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ...errors import UserError
from .common import check_batch, from_library, kind_of, per_sample

if TYPE_CHECKING:
    from torch import Tensor, nn

LIBRARY = "zuko"


def matches(module: nn.Module) -> bool:
    if not from_library(module, LIBRARY):
        return False
    from zuko.flows import Flow  # zuko.lazy.Flow in recent releases, same class

    return isinstance(module, Flow)


def terms(module: nn.Module, y: Tensor) -> dict[str, Tensor]:
    try:
        return _terms(module, y)
    except RuntimeError as exc:  # a shape mismatch inside zuko's networks
        raise UserError(f"zuko {type(module).__name__} failed on inputs of shape "
                        f"{tuple(y.shape[1:])} ({str(exc).splitlines()[0]}): audit an "
                        "unconditional flow (context=0) whose features equal C*H*W") from None


def _terms(module: nn.Module, y: Tensor) -> dict[str, Tensor]:
    from zuko.transforms import ComposedTransform

    dist = module()  # no context
    shape = tuple(dist.event_shape)
    if tuple(y.shape[1:]) != shape and math.prod(y.shape[1:]) == math.prod(shape):
        y = y.reshape(y.shape[0], *shape)
    transform, logdets = dist.transform, {}
    z = y
    if isinstance(transform, ComposedTransform):
        event_dim = transform.domain_dim
        for i, step in enumerate(transform.transforms):
            z, ladj = step.call_and_ladj(z)
            ladj = _sum_rightmost(ladj, event_dim - step.domain.event_dim)
            event_dim += step.codomain.event_dim - step.domain.event_dim
            logdets[f"logdet_t{i}_{kind_of(step)}"] = per_sample(
                _sum_rightmost(ladj, dist.reinterpreted), y)
    else:
        z, ladj = transform.call_and_ladj(z)
        logdets["logdet"] = per_sample(_sum_rightmost(ladj, dist.reinterpreted), y)
    log_pz = dist.base.log_prob(z)
    return check_batch({"log_pz": per_sample(log_pz, y), **logdets}, y.shape[0], LIBRARY)


def _sum_rightmost(value, dims: int):
    """Sum the last ``dims`` dimensions (zuko's and torch.distributions' convention)."""
    if dims <= 0 or not hasattr(value, "reshape"):
        return value
    return value.reshape(*value.shape[: value.dim() - dims], -1).sum(-1)
