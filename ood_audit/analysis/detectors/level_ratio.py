"""Per-dimension likelihood of a multi-scale flow's last level against its earlier ones."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, LevelTerms, level_dims, level_terms
from .base import Detector, Rows


def level_ratio_score(contributions: np.ndarray, dims) -> np.ndarray:
    """``contributions`` [N, L]: c_i = log p(z_i) + the log|det| of level i's steps (they
    sum to log p(x)); ``dims`` [L]: d_i, the dimensions factored out at level i (they sum
    to D). Score = c_{L-1} / d_{L-1} - sum_{i<L-1} c_i / sum_{i<L-1} d_i, in nats/dim."""
    c = np.asarray(contributions, dtype=float)
    d = np.asarray(dims, dtype=float)
    return c[:, -1] / d[-1] - c[:, :-1].sum(axis=1) / d[:-1].sum()


def levels(train: Rows, meta) -> tuple[list[list[str]], list[int]]:
    """Each level's terms and the dimensions it factors out, from the metadata."""
    return level_terms(meta), level_dims(meta)


def level_ratio(rows: Rows, fitted: tuple[list[list[str]], list[int]]) -> np.ndarray:
    """nats/dim of a multi-scale flow's last level minus its earlier levels':
    c_L / d_L - sum_{i<L} c_i / sum_{i<L} d_i, c_i = log p(z_i) + level i's log|det|.

    The first levels model local pixel correlations, which any image has; the last level
    carries the semantics, so its share of the likelihood tells the data sets apart.

    Paper: after Schirrmeister et al. 2020, "Understanding Anomaly Detection with Deep
    Invertible Networks through Hierarchies of Distributions and Features" (NeurIPS).
    Needs: a multi-scale flow (glow, glow-cv) with two or more levels.
    """
    groups, dims = fitted
    contributions = np.stack([np.sum([rows[t] for t in g], axis=0) for g in groups], axis=1)
    return level_ratio_score(contributions, dims)


DETECTOR = Detector("level-ratio", level_ratio, needs=(Columns(), LevelTerms()), prepare=levels)
