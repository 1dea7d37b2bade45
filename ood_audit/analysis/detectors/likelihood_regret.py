"""Xiao et al.'s likelihood regret of a VAE: the bound's gain from an encoder re-fit to x."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, EncoderRefit
from ...scoring.schema import REGRET_COLUMN
from .base import Detector, Rows


def likelihood_regret(rows: Rows, fitted: None = None) -> np.ndarray:
    """-LR(x), LR(x) = L(x; encoder re-fit to x) - L(x; trained encoder) >= 0: the gain
    of the VAE's importance-weighted bound (K = 16, the same draws before and after) when
    a copy of its encoder is re-fit to the single image (Adam, lr 2e-4, L2 5e-5, 100 steps
    on the ELBO, as the authors' code).

    The decoder was fitted to the training distribution; the amortised encoder serves its
    images nearly as well as a posterior fitted to each one, so re-fitting gains little on
    them, while an OOD image, whose likelihood the decoder can still make high, gains
    much: the regret removes what a generic decoder gives every input.

    Paper: Xiao, Yan & Amit 2020, "Likelihood Regret: An Out-of-Distribution Detection
    Score For Variational Auto-encoder" (NeurIPS).
    Needs: a VAE run (--model vae), named with score --detector likelihood-regret: an
    optimisation per image (slow; see benchmarks/README.md).
    """
    return -rows[REGRET_COLUMN]


DETECTOR = Detector("likelihood-regret", likelihood_regret, needs=(Columns(), EncoderRefit()))
