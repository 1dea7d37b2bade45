"""Per-pixel log-likelihood maps of a few images per set, for the report's heatmaps.

Only models that can say how much each pixel contributes (PixelCNN++'s autoregressive
factorisation: ``pixel_log_prob_map(x) -> [B, H, W]``) have maps. The scorer saves the
first few images of each scored set with their maps to ``pixel_maps.npz`` so the report,
which reads files only, can draw them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import dequantize
from ..models.base import DensityModel
from ..runs import atomic_path
from ..seeds import seeded

N_IMAGES = 4  # images per set drawn in the report


def has_pixel_maps(model: DensityModel) -> bool:
    return callable(getattr(model, "pixel_log_prob_map", None))


@torch.inference_mode()
def save_pixel_maps(model: DensityModel, jobs, path: Path, device: torch.device,
                    seed: int, n: int = N_IMAGES) -> bool:
    """Write images and maps (nats per pixel, summed over channels) for ``n`` images of
    each job; returns False (and writes nothing) for models without maps."""
    if not has_pixel_maps(model):
        return False
    arrays: dict[str, np.ndarray] = {}
    labels = []
    for i, job in enumerate(jobs):
        images = job.images.images[:n]
        x = dequantize(images, seeded(seed, job.key, -7)).to(device)
        arrays[f"map{i}"] = model.pixel_log_prob_map(x).double().cpu().numpy()
        arrays[f"image{i}"] = images.numpy()
        labels.append(f"{job.images.name} {job.images.split}"
                      + ("" if job.transform == "none" else f" [{job.transform}]"))
    arrays["labels"] = np.array(labels)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return True


def load_pixel_maps(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]] | None:
    """[(label, images uint8 [n,C,H,W], maps [n,H,W])] or None when the file is absent."""
    if not Path(path).exists():
        return None
    with np.load(path) as data:
        labels = [str(v) for v in data["labels"]]
        return [(label, data[f"image{i}"], data[f"map{i}"]) for i, label in enumerate(labels)]
