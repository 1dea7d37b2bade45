"""Input complexity with a lossless JPEG 2000 compressor as L(x)."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, DataFeature
from .base import Detector, Rows
from .complexity import complexity_score

FEATURE = "jp2_bits"


def complexity_jp2(rows: Rows, fitted: None = None) -> np.ndarray:
    """L(x) - bits_model(x), L = lossless JPEG 2000 length in bits (Pillow, OpenJPEG),
    bits_model = bpd * D: Serra et al.'s S(x), negated, with their second compressor.

    On 28x28 images the JPEG 2000 header is a large, constant share of L(x).

    Paper: Serra et al. 2020, "Input Complexity and Out-of-Distribution Detection with
    Likelihood-based Generative Models" (ICLR).
    Needs: Pillow built with OpenJPEG (the length is computed while scoring).
    """
    return complexity_score(rows["bpd"], rows["n_dims"], rows[FEATURE])


DETECTOR = Detector("complexity-jp2", complexity_jp2,
                    needs=(Columns(("bpd", "n_dims")), DataFeature(FEATURE)))
