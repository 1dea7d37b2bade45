"""Ren et al.'s likelihood ratio against a background model."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import BackgroundModel, Columns
from ...scoring.schema import BACKGROUND_COLUMN
from .base import Detector, Rows


def likelihood_ratio(rows: Rows, fitted: None = None) -> np.ndarray:
    """log p_model(x) - log p_background(x), the background model trained on inputs
    with each pixel replaced by a uniform random value with probability mu, and L2
    weight decay.

    The background model learns the population-level statistics (smooth regions, dark
    borders) that dominate log p(x) but not the semantics; the ratio cancels them.

    Paper: Ren et al. 2019, "Likelihood Ratios for Out-of-Distribution Detection"
    (NeurIPS).
    Needs: a background model in RUN/background (ood-audit train --background --run RUN).
    """
    return rows["log_px"] - rows[BACKGROUND_COLUMN]


DETECTOR = Detector("likelihood-ratio", likelihood_ratio, needs=(Columns(), BackgroundModel()))
