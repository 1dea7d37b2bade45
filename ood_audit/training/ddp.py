"""Data-parallel training pieces: a rank's slice of the global batch, and the DDP wrapper.

The trainer keeps its single-process data order under ``torchrun``: batch ``b`` of epoch
``e`` is the same set of images with the same dequantization noise as in one process,
and rank ``r`` takes its contiguous slice of it (a DistributedSampler-equivalent that
keeps the (seed, epoch, batch)-seeded exact resume, and makes a resume with another
world size continue the same trajectory). ``--batch-size`` is the global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import DistContext
from ..models.base import DensityModel
from .layout import align_optimizer_state, kernels_to


def rank_slice(n: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items: sizes differ by at most one, the
    first ``n % world`` ranks taking the extra one (as ``torch.tensor_split``)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class LossOf(nn.Module):
    """``forward(x) -> training_loss(x)`` so DistributedDataParallel, which hooks
    ``forward`` only, sees the loss computation of any :class:`DensityModel`.

    A rank whose slice of a ragged last batch is empty still returns a loss that touches
    every parameter (times zero): DDP needs a gradient from every rank for each bucket.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:  # [B] per-sample loss in nats
        if len(x) == 0:
            return sum(p.sum() for p in self.model.parameters()).reshape(1) * 0.0
        return self.model.training_loss(x)


def wrap_ddp(model: DensityModel, dist: DistContext,
             optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """DDP around ``LossOf(model)``. Built after the data-dependent init (or the resume
    load) because DDP broadcasts rank 0's parameters and buffers (ActNorm's
    ``initialized`` flag included) at construction, so every rank starts from rank 0's.

    The kernels first take the layout of the model's activations (channels-last for Glow
    on CPU), and ``optimizer``'s state with them: DDP's buckets follow the parameters'
    strides, so gradients then land in them without DDP's stride warning and strided
    copies. Only strides change, no value; oneDNN may pick another kernel for a layout,
    so trained weights agree with NCHW kernels' up to float rounding (7e-9 after 32 steps
    of the tiny Glow on CPU, the same bits/dim)."""
    kernels_to(model, model.activation_memory_format())
    if optimizer is not None:
        align_optimizer_state(optimizer)
    ids = [dist.device.index or 0] if dist.device.type == "cuda" else None
    return DistributedDataParallel(LossOf(model), device_ids=ids)


def step_stats(dist: DistContext, loss_sum: Tensor, n: int, stop: bool) -> tuple[float, int, bool, bool]:
    """One all-reduce per step of (loss sum, images, non-finite ranks, stopping ranks):
    the global mean loss, the global batch size, and decisions every rank takes alike
    (skip a non-finite step; stop after a signal on any rank) so none waits forever."""
    finite = bool(torch.isfinite(loss_sum))
    stats = torch.tensor([float(loss_sum) if finite else 0.0, n, 0 if finite else 1, int(stop)],
                         dtype=torch.float64, device=dist.device)
    dist.all_reduce_sum(stats)
    total, count, bad, stops = stats.tolist()
    return total / max(count, 1), int(count), bad == 0, stops > 0
