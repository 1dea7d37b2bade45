"""What the three adapters share: recognising a library's class without importing the
library, naming a transform's kind, and making every term a ``[B]`` tensor.

Nothing here imports torch at module level: :func:`per_sample` receives tensors and
uses their own methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

#: Kinds named as our Glow names them (``logdet_level{i}_{actnorm,invconv,coupling}``).
KIND_ALIASES = {
    "affinecouplingblock": "coupling",
    "affinecoupling": "coupling",
    "invertible1x1conv": "invconv",
    "onebyoneconvolution": "invconv",
}
_SUFFIXES = ("transform", "flow")


def from_library(module: object, library: str) -> bool:
    """Whether ``module``'s class (or a base class) is defined in ``library``.

    Cheap and import-free: if the class comes from the library, the library is already
    imported; if it does not (or the library is not installed), nothing is imported.
    """
    return any(c.__module__ == library or c.__module__.startswith(library + ".")
               for c in type(module).__mro__)


def kind_of(layer: object) -> str:
    """A short lower-case name for a transform: its class name without a ``Transform`` /
    ``Flow`` suffix (``MaskedAffineAutoregressiveTransform`` -> ``maskedaffineautoregressive``),
    with our Glow's names where the layer is the same kind (``invconv``, ``coupling``)."""
    name = type(layer).__name__.lower()
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return KIND_ALIASES.get(name, name)


def per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A log-det as a fresh ``[B]`` tensor (``B = len(like)``): libraries return some
    constant ones (ActNorm, permutations) as a scalar or a 0-d tensor."""
    batch = like.shape[0]
    if not hasattr(value, "reshape"):  # a Python number
        floats = like if like.is_floating_point() else like.float()
        return floats.new_full((batch,), float(value))
    if value.dim() == 0:
        return value.reshape(1).expand(batch).clone()
    if tuple(value.shape) != (batch,):
        raise ValueError(f"a log-det of shape {tuple(value.shape)} for a batch of {batch}")
    return value


def is_zero_number(value: object) -> bool:
    """A log-det the library returns as the plain number 0 (a reshape or split): it adds
    no term."""
    return isinstance(value, (int, float)) and value == 0


def check_batch(terms: dict[str, Tensor], batch: int, library: str) -> dict[str, Tensor]:
    """Every term ``[B]``, or a ValueError naming the term (a library bug or misuse)."""
    for name, value in terms.items():
        if tuple(value.shape) != (batch,):
            raise ValueError(f"{library} adapter: term {name} has shape {tuple(value.shape)}, "
                             f"expected ({batch},)")
    return terms
