"""The WAIC of an ensemble of density models."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, Ensemble, member_columns
from .base import Detector, Rows


def waic_score(log_px_members: np.ndarray) -> np.ndarray:
    """WAIC(x) = mean_j log p_j(x) - var_j log p_j(x) over the M members (axis 1; sample
    variance, ddof=1), Choi et al. 2018."""
    v = np.asarray(log_px_members, dtype=float)
    return v.mean(axis=1) - v.var(axis=1, ddof=1)


def waic(rows: Rows, fitted: None = None) -> np.ndarray:
    """mean - variance of log p(x) over an ensemble: WAIC(x) = E_j log p_j(x) -
    Var_j log p_j(x) over M models trained on the same data (this run is member 0).

    Members disagree more on inputs unlike their data; the variance penalises that.

    Paper: Choi, Jang & Alemi 2018, "WAIC, but Why? Generative Ensembles for Robust
    Anomaly Detection".
    Needs: an ensemble, score --member RUN2 [--member RUN3 ...] or score RUN a folder
    written by train --seeds.
    """
    columns = ["log_px", *member_columns(rows)]
    return waic_score(np.stack([rows[c] for c in columns], axis=1))


DETECTOR = Detector("waic", waic, needs=(Columns(), Ensemble()))
