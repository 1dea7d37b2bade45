"""Serra et al.'s input complexity, with a PNG compressor as L(x)."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, DataFeature
from .base import Detector, Rows

FEATURE = "png_bits"


def complexity_score(bpd: np.ndarray, n_dims: np.ndarray, compressed_bits: np.ndarray) -> np.ndarray:
    """-S(x) = L(x) - bits_model(x) with bits_model = bpd * D = -log2 P(k), the model's
    discrete code length (Serra et al. 2020, S(x) = -log2 p(x) - L(x), higher S = OOD)."""
    return np.asarray(compressed_bits, float) - np.asarray(bpd, float) * np.asarray(n_dims, float)


def complexity(rows: Rows, fitted: None = None) -> np.ndarray:
    """L(x) - bits_model(x), L = PNG length in bits (Pillow, zlib level 9), bits_model =
    bpd * D = -log2 P(k): Serra et al.'s S(x), negated.

    Simple inputs (a constant image, a centred digit) are likely under any model; the
    compressor's code length stands in for that complexity bias and is subtracted.

    Paper: Serra et al. 2020, "Input Complexity and Out-of-Distribution Detection with
    Likelihood-based Generative Models" (ICLR).
    Needs: nothing more (the PNG length is computed from the pixels while scoring).
    """
    return complexity_score(rows["bpd"], rows["n_dims"], rows[FEATURE])


DETECTOR = Detector("complexity", complexity,
                    needs=(Columns(("bpd", "n_dims")), DataFeature(FEATURE)))
