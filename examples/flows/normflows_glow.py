"""A normflows Glow (multi-scale, 2 levels of 2 steps) for ood-audit.

    ood_audit.audit(make(), "fashionmnist", ood=["mnist"])        # Python
    ood-audit import python examples/flows/normflows_glow.py:make --data fashionmnist --out RUN

``make()`` builds it untrained, the same weights every time (seed 0; the caller's random
state is left as it was); ActNorm starts at the identity instead of normflows' first-batch
initialisation. ``fit()`` trains it for a few steps. It takes images x in [0, 1)
(``input_range="0,1"``, the default) of shape (1, 28, 28); any (C, H, W) with H and W
divisible by 4 works. The adapter (``ood_audit.models.adapters.normflows``) writes our
Glow's columns: ``log_pz_level{0,1}``, ``logdet_level{0,1}_{actnorm,invconv,coupling}``.
"""

from __future__ import annotations

import normflows as nf
import torch

INPUT_RANGE = "0,1"


def make(shape: tuple[int, int, int] = (1, 28, 28), levels: int = 2, steps: int = 2,
         hidden: int = 32, seed: int = 0) -> nf.MultiscaleFlow:
    c, h, w = shape
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        q0, flows, merges = [], [], []
        for i in range(levels):  # normflows' level 0 is the top (coarsest) one
            flows.append([nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel",
                                             scale=True) for _ in range(steps)]
                         + [nf.flows.Squeeze()])
            k = levels if i == 0 else levels - i
            if i > 0:
                merges.append(nf.flows.Merge())
            channels = c * 2 ** (levels + 1) if i == 0 else c * 2 ** (levels - i)
            q0.append(nf.distributions.DiagGaussian((channels, h // 2 ** k, w // 2 ** k)))
        flow = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    for layer in flow.modules():
        if isinstance(layer, nf.flows.ActNorm):
            layer.data_dep_init_done.fill_(1.0)  # identity start; no first-batch init
    return flow.eval()


def fit(flow: nf.MultiscaleFlow, images: torch.Tensor, steps: int = 50, batch_size: int = 64,
        lr: float = 3e-3, seed: int = 0) -> nf.MultiscaleFlow:
    """A few Adam steps of maximum likelihood on uint8 images [N, C, H, W], dequantized as
    ood-audit does (x = (k + u) / 256)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    flow.train()
    for _ in range(steps):
        k = images[torch.randint(len(images), (batch_size,), generator=gen)].float()
        x = (k + torch.rand(k.shape, generator=gen)) / 256
        loss = flow.forward_kld(x)  # -mean log p(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()
