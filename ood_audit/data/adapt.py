"""The explicit rule that fits an OOD set to a model's input shape (C, H, W).

Scoring an OOD set with a model needs both in the same shape. ood-audit never does
this silently: it applies one documented rule and records it in ``ImageSet.adaptation``
so every report says what was done.

- Channels, 1 -> 3: replicate the gray channel (R = G = B = gray).
- Channels, 3 -> 1: ITU-R BT.601 luminance, Y = 0.299 R + 0.587 G + 0.114 B.
  (Graying lowers variance and so raises likelihood, Nalisnick et al. 2019; see
  docs/paper.md, point 5: a gray-converted OOD set is itself part of the experiment.)
- Any other channel mismatch is a UserError: no rule is defined.
- Spatial, different H x W: ``torchvision.transforms.v2.functional.resize`` with
  bilinear interpolation and antialias=True (no crop, aspect ratio not kept).

The arithmetic is done in float32 and rounded to uint8 once at the end (round half to
even, clamped to 0..255), so gray conversion plus resize is not rounded twice.
Images are processed in chunks to bound memory.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import UserError
from .images import ImageSet
from .transforms import CHUNK, LUMA_BT601


def adapt_to_shape(images: ImageSet, shape: tuple[int, int, int]) -> ImageSet:
    """``images`` in ``shape`` by the rule above; the same object when already in shape."""
    c_to, h_to, w_to = (int(v) for v in shape)
    c_from, h_from, w_from = images.shape
    if (c_from, h_from, w_from) == (c_to, h_to, w_to):
        return images
    steps = []
    if c_from != c_to:
        if (c_from, c_to) == (1, 3):
            steps.append("gray->RGB (replicate channel)")
        elif (c_from, c_to) == (3, 1):
            steps.append("RGB->gray (ITU-R BT.601 luminance 0.299, 0.587, 0.114)")
        else:
            raise UserError(
                f"{images.name} has {c_from} channels but the model takes {c_to}: only 1<->3 "
                f"channel conversion is defined; convert the images to {c_to} channel(s) yourself"
            )
    resize = (h_from, w_from) != (h_to, w_to)
    if resize:
        steps.append(f"{h_from}x{w_from}->{h_to}x{w_to} (bilinear resize, antialias)")

    out = torch.empty((len(images), c_to, h_to, w_to), dtype=torch.uint8)
    for start in range(0, len(images), CHUNK):
        x = images.images[start:start + CHUNK].to(torch.float32)  # [B, C, H, W]
        if c_from == 3 and c_to == 1:
            weights = torch.tensor(LUMA_BT601, dtype=torch.float32).view(1, 3, 1, 1)
            x = (x * weights).sum(dim=1, keepdim=True)  # before resizing: a third of the work
        if resize:
            x = _resize(x, h_to, w_to)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        if c_from == 1 and c_to == 3:
            x = x.expand(-1, 3, -1, -1)  # after resizing: a third of the work
        out[start:start + CHUNK] = x

    done = "; ".join(steps)
    adaptation = f"{images.adaptation}; {done}" if images.adaptation else done
    return replace(images, images=out, adaptation=adaptation)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode  # lazy: start-up time
    from torchvision.transforms.v2 import functional as F  # lazy: start-up time

    return F.resize(x, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
