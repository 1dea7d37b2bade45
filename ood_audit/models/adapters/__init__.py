"""Adapters: per-sample likelihood terms from flows built with other libraries.

``ood-audit import python FILE:FACTORY`` (and ``ood_audit.audit``) wrap any
``torch.nn.Module`` with a ``log_prob(y) -> [B]``; when the module is a flow of a library
named here, its adapter hands back the flow's own terms instead of one ``log_prob``
column, so ``decompose`` can split the likelihood as it does for our Glow.

The contract, one :class:`Adapter` per library, tried in order (first match wins):

- ``matches(module) -> bool``: is this module a flow of that library?
- ``terms(module, y) -> dict[str, Tensor]``: per-sample terms, each ``[B]`` float, in nats,
  for inputs ``y`` already in the module's own input space and shape; they sum to the
  library's own ``log_prob(y)`` (a test checks it per library). Names follow our
  columns: ``log_pz`` for the base distribution, ``logdet_t{i}_{kind}`` per transform
  where the library exposes them (``kind`` a short lower-case layer name), else one
  ``logdet``. A multi-scale flow with one base distribution per level (normflows'
  ``MultiscaleFlow``) uses our Glow's names instead: ``log_pz_level{i}``,
  ``logdet_level{i}_{kind}``.

The import wrapper adds the change of variables of the input range (``D log|a|``) and the
discrete offset, so the terms it writes sum to log p(x) of our dequantized x in [0, 1)^D.
Libraries are optional (``pip install ood-audit[flows]``): an adapter imports its library
inside ``matches``/``terms`` only, and a module of a library that is not installed simply
matches no adapter.

One module per library says what it recognises and which terms it writes:
:mod:`.normflows`, :mod:`.nflows`, :mod:`.zuko`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import nflows as _nflows
from . import normflows as _normflows
from . import zuko as _zuko

if TYPE_CHECKING:  # torch stays out of start-up (``--help``)
    from torch import Tensor, nn


@dataclass(frozen=True)
class Adapter:
    name: str  # the library, e.g. "normflows"
    matches: Callable[[nn.Module], bool]
    terms: Callable[[nn.Module, Tensor], dict[str, Tensor]]


#: Registered adapters, tried in order.
ADAPTERS: list[Adapter] = [
    Adapter(m.LIBRARY, m.matches, m.terms) for m in (_normflows, _nflows, _zuko)
]


def adapter_for(module: nn.Module) -> Adapter | None:
    """The first adapter whose ``matches`` accepts ``module``, or None (plain ``log_prob``)."""
    return next((a for a in ADAPTERS if a.matches(module)), None)
