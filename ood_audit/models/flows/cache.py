"""Scoring caches of values that depend on parameters only (a 1x1 convolution's kernel,
ActNorm's scale), and the policy of when they are used.

A layer says *what* may be cached (:func:`cached`); *whether* caching is on is decided
outside it: never while training, with autograd on or under torch.compile, and not while
the composite runs the naive baseline (:func:`caching`, set by
:class:`~ood_audit.models.flows.multiscale.MultiScaleFlow`). The composite drops every
cache when it switches mode (:func:`clear_caches`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("flow_caches", default=True)


@contextlib.contextmanager
def caching(enabled: bool) -> Iterator[None]:
    """Caches on (the exact path) or off (the naive baseline) for the calls inside."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def clear_caches(module: nn.Module) -> None:
    """Forget every cached value of ``module`` and its submodules."""
    for m in module.modules():
        m.__dict__.pop("_cache", None)


def _version_key(tensors: tuple[Tensor, ...]) -> tuple | None:
    """What identifies the values of ``tensors``: storage address and version counter
    (bumped by every in-place write: optimizer steps, ``load_state_dict``, ``copy_``).
    None when a tensor has no version counter (one created under inference_mode)."""
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None


def cached(module: nn.Module, name: str, tensors: tuple[Tensor, ...], compute):
    """``compute()``, memoised on ``module`` while none of ``tensors`` changed.

    Used only when it is safe without any call from the scorer: the module is in eval mode,
    autograd is off (no_grad / inference_mode: no gradient has to flow through the value)
    and the caller has not turned caching off (:func:`caching`: the benchmark's uncached
    baseline). Any in-place write to a tensor bumps its version and the next call recomputes;
    only writes through ``.data`` (which bypass version counters) would go unseen. Under
    torch.compile the compiler sees the plain computation (it fuses it; no graph break).
    """
    if (torch.compiler.is_compiling() or module.training or torch.is_grad_enabled()
            or not _ENABLED.get()):
        return compute()
    key = _version_key(tensors)
    if key is None:
        return compute()
    key = (torch.is_inference_mode_enabled(), *key)
    store = module.__dict__.setdefault("_cache", {})
    hit = store.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    store[name] = (key, value)
    return value
