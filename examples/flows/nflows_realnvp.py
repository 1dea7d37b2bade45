"""An nflows RealNVP (affine couplings over the flattened image) for ood-audit.

    ood_audit.audit(make(), "fashionmnist", ood=["mnist"])        # Python
    ood-audit import python examples/flows/nflows_realnvp.py:make --data fashionmnist --out RUN

``make()`` builds ``Flow(CompositeTransform([...]), StandardNormal([D]))`` untrained, the
same weights every time (seed 0; the caller's random state is left as it was); ``fit()``
trains it for a few steps. It takes images x in [0, 1) (``input_range="0,1"``, the
default) of shape (1, 28, 28): its first transform, :class:`Flatten`, turns them into the
vectors nflows' couplings take. The adapter (``ood_audit.models.adapters.nflows``)
writes ``log_pz`` and one ``logdet_t{i}_{kind}`` per transform: ``logdet_t0_flatten``
(0), then ``coupling``, ``actnorm`` and ``reversepermutation`` ones.
"""

from __future__ import annotations

import math

import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.nn.nets import ResidualNet
from nflows.transforms import ActNorm, AffineCouplingTransform, CompositeTransform, ReversePermutation
from nflows.transforms.base import Transform

INPUT_RANGE = "0,1"


class Flatten(Transform):
    """[B, C, H, W] images <-> [B, C*H*W] vectors; log|det| 0."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, inputs, context=None):
        return inputs.reshape(len(inputs), -1), inputs.new_zeros(len(inputs))

    def inverse(self, inputs, context=None):
        return inputs.reshape(len(inputs), *self.shape), inputs.new_zeros(len(inputs))


def make(shape: tuple[int, int, int] = (1, 28, 28), layers: int = 4, hidden: int = 64,
         seed: int = 0) -> Flow:
    features = math.prod(shape)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transforms: list[Transform] = [Flatten(shape)]
        for i in range(layers):
            mask = (torch.arange(features) + i) % 2  # alternate which half is transformed
            transforms += [AffineCouplingTransform(
                mask, lambda n_in, n_out: ResidualNet(n_in, n_out, hidden, num_blocks=1)),
                ActNorm(features), ReversePermutation(features)]
        flow = Flow(CompositeTransform(transforms), StandardNormal([features]))
    return flow.eval()  # eval: ActNorm initialises from a first batch in training mode only


def fit(flow: Flow, images: torch.Tensor, steps: int = 50, batch_size: int = 64, lr: float = 3e-3,
        seed: int = 0) -> Flow:
    """A few Adam steps of maximum likelihood on uint8 images [N, C, H, W], dequantized as
    ood-audit does (x = (k + u) / 256)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    flow.train()
    for _ in range(steps):
        k = images[torch.randint(len(images), (batch_size,), generator=gen)].float()
        loss = -flow.log_prob((k + torch.rand(k.shape, generator=gen)) / 256).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()
