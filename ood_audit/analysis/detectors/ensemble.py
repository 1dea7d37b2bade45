"""The ensemble's own density."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, Ensemble
from ...scoring.schema import ENSEMBLE_COLUMN
from .base import Detector, Rows


def ensemble(rows: Rows, fitted: None = None) -> np.ndarray:
    """log of the ensemble's mean density, log (1/M) sum_j p_j(x) over M models trained on
    the same data.

    Ensembling sharpens each model's density but does not close the likelihood gap.

    Paper: Nalisnick et al. 2019, "Do Deep Generative Models Know What They Don't Know?"
    (ICLR).
    Needs: an ensemble, score --member RUN2 ... or score a folder written by train
    --seeds.
    """
    return rows[ENSEMBLE_COLUMN]


DETECTOR = Detector("ensemble", ensemble, needs=(Columns(), Ensemble(mean=True)))
