"""Data features: per-image numbers computed from the raw pixels, with no model.

The input-complexity detector (Serra et al., ICLR 2020) needs L(x), the length in bits of
the image under a generic lossless compressor. Each :class:`Feature` turns uint8 images
``[N, C, H, W]`` into one float per image; ``ood-audit score`` writes it as an extra
column (not a model term: it is not part of the sum that gives ``log_px``).

- ``png_bits``: 8 * bytes of the PNG file at maximum zlib compression (Pillow,
  ``compress_level=9``), the compressor Serra et al. use by default.
- ``jp2_bits``: 8 * bytes of a lossless (reversible 5/3 wavelet) JPEG 2000 file (Pillow
  with OpenJPEG). On 28x28 images its header is a large, constant share of the length.

Both count the whole file, headers included: a constant per image shape, which moves no
ranking between images of one shape. Channels: 1 -> grayscale, 3 -> RGB, 4 -> RGBA;
any other count is laid out side by side as one grayscale image.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, features

from ..errors import UserError


@dataclass(frozen=True)
class Feature:
    column: str
    summary: str
    compute: Callable[[np.ndarray], float]  # one uint8 [H, W] / [H, W, C] image -> bits
    available: Callable[[], bool] = lambda: True


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 ``[C, H, W]`` -> a PIL image (see the module docstring for the channel rule)."""
    c = image.shape[0]
    if c == 1:
        return Image.fromarray(np.ascontiguousarray(image[0]), mode="L")
    if c in (3, 4):
        return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)),
                               mode="RGB" if c == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(np.concatenate(list(image), axis=1)), mode="L")


def _encoded_bits(image: np.ndarray, **save) -> float:
    buf = io.BytesIO()
    to_pil(image).save(buf, **save)
    return float(8 * len(buf.getvalue()))


def png_bits(image: np.ndarray) -> float:
    return _encoded_bits(image, format="PNG", compress_level=9)


def jp2_bits(image: np.ndarray) -> float:
    return _encoded_bits(image, format="JPEG2000", irreversible=False)


FEATURES: dict[str, Feature] = {
    f.column: f
    for f in [
        Feature("png_bits", "PNG length in bits (Pillow, zlib level 9)", png_bits),
        Feature("jp2_bits", "lossless JPEG 2000 length in bits (Pillow, OpenJPEG)", jp2_bits,
                lambda: bool(features.check("jpg_2000"))),
    ]
}


def compute_feature(name: str, images: torch.Tensor) -> np.ndarray:
    """Feature ``name`` of uint8 ``images`` [N, C, H, W]: float64 [N]."""
    feature = FEATURES.get(name)
    if feature is None:
        raise UserError(f"unknown data feature {name!r}; choose from {', '.join(FEATURES)}")
    if not feature.available():
        raise UserError(f"feature {name} needs Pillow built with its codec, which this "
                        "Pillow lacks; reinstall Pillow from its wheels")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"features take uint8 [N, C, H, W] images, got {images.dtype} "
                         f"{tuple(images.shape)}")
    arr = images.cpu().numpy()
    return np.array([feature.compute(im) for im in arr], dtype=np.float64)
