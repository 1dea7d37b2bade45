"""Memory layout of parameters and their optimizer state.

DistributedDataParallel copies each gradient into a bucket view with the strides its
parameter had when DDP was built, and warns ("Grad strides do not match bucket view
strides", a strided copy per gradient per step) when the gradient arrives with others. A
convolution over channels-last activations gives its kernel a channels-last gradient,
so a model that convolves channels-last (Glow on CPU) needs channels-last kernels.
Autograd's own layout contract ignores the strides of size-1 dimensions, which is why
the 1x1 kernels' gradients reached DDP in a layout other than their parameter's.

Fused Adam walks a parameter, its gradient and its moments as flat memory, so each
moment must share its parameter's strides, or elements are silently mixed.
"""

from __future__ import annotations

import torch
from torch import nn


def is_kernel(p: torch.Tensor) -> bool:
    """A 4-D parameter with more than one leading entry: a convolution kernel
    ``[out, in, kh, kw]`` (of ``nn.Conv2d`` or any module calling ``F.conv2d`` with it). A
    leading 1 marks a per-channel tensor broadcast over the batch (ActNorm's bias, a
    prior's mean), whose gradient is a batch reduction that comes out NCHW."""
    return p.dim() == 4 and p.shape[0] > 1


def kernels_to(model: nn.Module, memory_format: torch.memory_format) -> int:
    """Lay out every kernel of ``model`` (:func:`is_kernel`) in ``memory_format``, in place
    (the same Parameter objects, so optimizers keep them); values unchanged. Returns how
    many changed layout."""
    moved = 0
    with torch.no_grad():
        for p in model.parameters():
            if not is_kernel(p):
                continue
            # empty_like gives the canonical strides, size-1 dimensions included (a 1x1
            # kernel is "contiguous" in both formats, but DDP compares every stride).
            target = torch.empty_like(p, memory_format=memory_format)
            if target.stride() != p.stride():
                p.data = target.copy_(p)  # a new storage: caches keyed on it recompute
                moved += 1
    return moved


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Give each state tensor shaped like its parameter (Adam's moments) the parameter's
    strides; values unchanged. Needed after a parameter changed layout and after
    ``load_state_dict``, which keeps the strides the state was saved with. Returns how
    many tensors changed layout."""
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (torch.is_tensor(value) and value.shape == p.shape
                        and value.stride() != p.stride()):
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    moved += 1
    return moved
