"""Normalizing-flow building blocks: invertible layers under one contract
(:mod:`.base`), the priors of a multi-scale flow (:mod:`.priors`), and the composite that
runs them and names their terms (:mod:`.multiscale`).

- :mod:`.actnorm`: ActNorm; :mod:`.invconv`: the 1x1 convolution; :mod:`.coupling`:
  affine and additive coupling; :mod:`.squeeze`: space-to-depth;
- :mod:`.convs`: the convolutions inside coupling networks and priors;
- :mod:`.cache`: scoring caches of parameter-only values, and when they apply.
"""

from .actnorm import ActNorm, actnorm_init
from .base import FlowLayer, gaussian_log_density
from .convs import ActNormConv2d, EdgeConv2d, ZeroConv2d, edge_mask
from .coupling import AdditiveCoupling, AffineCoupling
from .invconv import InvConv1x1
from .priors import Prior, SplitPrior, TopPrior
from .squeeze import Squeeze

__all__ = ["ActNorm", "ActNormConv2d", "AdditiveCoupling", "AffineCoupling", "EdgeConv2d",
           "FlowLayer", "InvConv1x1", "Prior", "SplitPrior", "Squeeze", "TopPrior", "ZeroConv2d",
           "actnorm_init", "edge_mask", "gaussian_log_density"]
