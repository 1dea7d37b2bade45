"""A zuko neural spline flow (NSF) over the flattened image, taking pixels in [-1, 1).

    ood_audit.audit(make(), "fashionmnist", ood=["mnist"], input_range="-1,1")      # Python
    ood-audit import python examples/flows/zuko_nsf.py:make --input-range -1,1 --data fashionmnist --out RUN

``make()`` returns the zuko flow *module* (``zuko.flows.NSF``), not the distribution
``flow()``: the module holds the parameters, and the adapter
(``ood_audit.models.adapters.zuko``) calls it to score. Untrained, the same weights every
time (seed 0; the caller's random state is left as it was); ``fit()`` trains it for a few
steps. It takes y = 2x - 1 for ood-audit's x in [0, 1) (``input_range="-1,1"``: the
change of variables adds D log 2 to log p(x), so bits/dim compare with any other
model), flattened to ``features = C*H*W`` by the adapter. Terms: ``log_pz`` and
``logdet_t{i}_autoregressive``, one per transform.
"""

from __future__ import annotations

import math

import torch
import zuko

INPUT_RANGE = "-1,1"


def make(shape: tuple[int, int, int] = (1, 28, 28), transforms: int = 2, hidden: int = 32,
         seed: int = 0) -> zuko.flows.NSF:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        flow = zuko.flows.NSF(features=math.prod(shape), transforms=transforms,
                              hidden_features=(hidden,))
    return flow.eval()


def fit(flow: zuko.flows.NSF, images: torch.Tensor, steps: int = 50, batch_size: int = 64,
        lr: float = 3e-3, seed: int = 0) -> zuko.flows.NSF:
    """A few Adam steps of maximum likelihood on uint8 images [N, C, H, W], dequantized as
    ood-audit does (x = (k + u) / 256) and mapped to [-1, 1)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    flow.train()
    for _ in range(steps):
        k = images[torch.randint(len(images), (batch_size,), generator=gen)].float()
        y = 2 * (k + torch.rand(k.shape, generator=gen)) / 256 - 1
        loss = -flow().log_prob(y.flatten(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()
