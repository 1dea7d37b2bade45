"""Density of states (Morningstar et al. 2021): how typical an input's statistics are.

DoSE does not compare model probabilities directly; it asks how often in-distribution
inputs the model never saw have statistics like this input's: log p(x), and the terms the
model's likelihood is made of (log p(z) per level and log|det| per level and layer kind
for a flow; reconstruction, KL and importance-weighting gain for a VAE; per-channel terms
for PixelCNN++). A density estimator fitted on those statistics of held-out
in-distribution inputs scores a new input: low density = atypical = OOD.

Two estimators, both with rules fixed in advance (nothing is tuned, and nothing sees OOD
data):

- :func:`kde_log_density`: one Gaussian KDE per statistic, the statistics treated as
  independent (their log-densities add up), each standardised by its held-out mean and
  standard deviation, with Scott's bandwidth h = n^(-1/5) in standard deviations (as
  ``scipy.stats.gaussian_kde``'s default): no tuning on any data;
- :func:`kde_log_two_sided_p` and :func:`min_p`: each statistic's two-sided tail
  probability under the same KDE, combined by their minimum (Tippett's method): an input
  is as atypical as its most atypical statistic, so one statistic that carries an OOD set
  is not averaged away by the others;
- :func:`svm_score`: a one-class SVM (RBF kernel, gamma = 1/d on the standardised
  statistics, nu = 0.1) over the joint vector of statistics.

Both score in chunks of rows, so the memory they add is the fitted train rows and one
chunk's kernel matrix, whatever the size of the table scored. The KDEs are evaluated
exactly on a grid refined until linear interpolation is within GRID_TOL = 1e-3 nats at
every interval's midpoint, and interpolated: their time grows with the table only
through the rows far outside the train rows. NumPy only at import (scipy and
scikit-learn load when a fit or a score needs them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Kernel entries computed at once (rows x train rows): 1M float64, 8 MB a temporary.
CHUNK_ENTRIES = 2**20
#: Where a KDE is evaluated on a grid and interpolated: out to GRID_MARGIN bandwidths
#: beyond the last train row on either side (exact beyond), starting GRID_STEP bandwidths
#: apart, halved where the interpolation misses a midpoint by more than GRID_TOL nats.
GRID_STEP, GRID_MARGIN, GRID_TOL = 1 / 8, 12.0, 1e-3
#: One-class SVM's nu (an upper bound on the share of train rows outside its boundary).
SVM_NU = 0.1


@dataclass(frozen=True)
class Statistics:
    """The statistics a density of states is fitted on: their names, the held-out mean
    and standard deviation of each, and the standardised train rows ``[n, d]``."""

    names: tuple[str, ...]
    mean: np.ndarray  # [d]
    std: np.ndarray  # [d]
    train: np.ndarray  # [n, d], standardised

    @property
    def n(self) -> int:
        return int(self.train.shape[0])

    def standardise(self, rows: Mapping[str, np.ndarray], start: int = 0,
                    stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``rows`` as the ``[m, d]`` standardised statistics."""
        cols = [np.asarray(rows[c], float)[start:stop] for c in self.names]
        return (np.stack(cols, axis=1) - self.mean) / self.std


def candidate_statistics(terms: Sequence[str], totals: Sequence[str],
                         extra: Sequence[str] = ()) -> list[str]:
    """log p(x), the model's terms, their group totals, then ``extra``: the statistics a
    density of states considers, in that order, each once."""
    return list(dict.fromkeys(["log_px", *terms, *totals, *extra]))


def fit_statistics(train: Mapping[str, np.ndarray], names: Sequence[str]) -> Statistics:
    """Standardise the statistics ``names`` of the in-distribution train rows ``train``.

    Rows with a non-finite statistic are left out of the fit. A statistic is dropped when
    it does not vary over the rows (a flow's ActNorm and 1x1-convolution log|det|, which
    do not depend on x; additive coupling's 0) or repeats an earlier one exactly (a one-
    channel PixelCNN++'s only term is log p(x)): it carries nothing a density could use.
    ValueError when fewer than two usable rows or no varying statistic remain.
    """
    present = [c for c in names if c in train]
    if not present:
        raise ValueError(f"none of the statistics {list(names)} is in the table")
    matrix = np.stack([np.asarray(train[c], float) for c in present], axis=1)
    matrix = matrix[np.isfinite(matrix).all(axis=1)]
    if matrix.shape[0] < 2:
        raise ValueError("fewer than two in-distribution train rows with finite statistics")
    keep: list[int] = []
    for j in range(matrix.shape[1]):
        col = matrix[:, j]
        spread = col.std(ddof=1)
        if not spread > 1e-6 * (abs(col.mean()) + 1.0):  # constant up to float32 rounding
            continue
        if any(np.array_equal(col, matrix[:, k]) for k in keep):
            continue
        keep.append(j)
    if not keep:
        raise ValueError("no statistic varies over the in-distribution train rows")
    kept = matrix[:, keep]
    mean, std = kept.mean(axis=0), kept.std(axis=0, ddof=1)
    return Statistics(tuple(present[j] for j in keep), mean, std, (kept - mean) / std)


def scott_bandwidth(n: int) -> float:
    """Scott's rule for one dimension, in standard deviations: h = n^(-1/5)."""
    return float(n) ** -0.2


def _chunk_rows(n_train: int) -> int:
    """Rows scored at once, so a chunk's kernel matrix holds CHUNK_ENTRIES entries."""
    return max(1, CHUNK_ENTRIES // max(1, n_train))


def _log_mean_exp(a: np.ndarray) -> np.ndarray:
    """log mean_i exp(a[:, i]) per row, shifted by the row's maximum (no underflow); a row
    of -inf gives -inf, a NaN gives NaN. NumPy only: scipy's logsumexp is several times
    slower on these [chunk, n] blocks."""
    top = np.max(a, axis=1)  # [chunk]
    finite = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.mean(np.exp(a - finite[:, None]), axis=1)) + finite
    return np.where(np.isneginf(top), -np.inf, out)


def _exact(t: np.ndarray, ref: np.ndarray, h: float, kernel, width: int) -> np.ndarray:
    """``kernel(d)`` ([chunk, n] distances (t - ref) / h -> [chunk, width]) for every
    value of ``t`` ([m]), a chunk of rows at a time: [m, width]."""
    out = np.empty((len(t), width))
    step = _chunk_rows(len(ref))
    for start in range(0, len(t), step):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            d = (t[start:start + step, None] - ref[None, :]) / h  # [chunk, n]
            out[start:start + step] = kernel(d).reshape(len(d), width)
    return out


def _on_grid(t: np.ndarray, ref: np.ndarray, h: float, kernel, width: int) -> np.ndarray:
    """:func:`_exact` for the values of ``t`` ([N]) beyond GRID_MARGIN bandwidths of
    every train row ``ref`` (and NaN, +-inf); within, linear interpolation between exact
    values on an adaptive grid, so the cost grows with (grid + rows beyond it) x n instead
    of N x n.

    The grid starts GRID_STEP bandwidths apart; each interval whose midpoint value differs
    from the interpolation by more than GRID_TOL nats is halved, and its halves checked
    again, until none does. A KDE's log-density and log tails are smooth on the scale of a
    bandwidth, where the error of linear interpolation is ~ step^2 / 8 |f''|, so this
    midpoint check measures it; it is needed because between two distant train rows
    (heavy tails, outliers) the log-density curves far more than a single kernel's
    -d^2 / 2. Where the grid would hold as many points as the rows it serves, every row
    is evaluated exactly instead."""
    lo, hi = float(ref.min()) - GRID_MARGIN * h, float(ref.max()) + GRID_MARGIN * h
    inside = (t >= lo) & (t <= hi)  # False for NaN
    budget = int(inside.sum())
    points = np.linspace(lo, hi, int(math.ceil((hi - lo) / (GRID_STEP * h))) + 1)
    if len(points) >= budget:
        return _exact(t, ref, h, kernel, width)
    values = _exact(points, ref, h, kernel, width)  # [size, width]
    left = np.arange(len(points) - 1)  # intervals [points[i], points[i + 1]] to check
    while len(left):
        if len(points) + len(left) >= budget:
            return _exact(t, ref, h, kernel, width)
        mids = 0.5 * (points[left] + points[left + 1])
        at_mids = _exact(mids, ref, h, kernel, width)  # [m, width]
        with np.errstate(invalid="ignore"):
            err = np.abs(at_mids - 0.5 * (values[left] + values[left + 1])).max(axis=1)
        coarse = ~(err <= GRID_TOL)  # NaN (inf - inf) counts as too coarse
        # insert every midpoint computed; the halves of a coarse interval are checked next
        order = np.argsort(np.concatenate([points, mids]), kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        mid_rank = rank[len(points):][coarse]
        points = np.concatenate([points, mids])[order]
        values = np.concatenate([values, at_mids])[order]
        left = np.sort(np.concatenate([mid_rank - 1, mid_rank]))
    out = np.empty((len(t), width))
    for k in range(width):
        out[inside, k] = np.interp(t[inside], points, values[:, k])
    out[~inside] = _exact(t[~inside], ref, h, kernel, width)
    return out


def kde_log_density(stats: Statistics, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """sum_j log f_j(t_j(x)) per row of ``rows`` ([N]), f_j the Gaussian KDE of statistic
    j over the fitted train rows, in the statistic's own units:

        f_j(t) = 1/(n h s_j) sum_i phi((t - t_ij) / (h s_j)),  h = n^(-1/5),

    s_j its held-out standard deviation (this is ``scipy.stats.gaussian_kde(t_j).pdf``,
    interpolated on a grid checked to GRID_TOL = 1e-3 nats: see :func:`_on_grid`). Far
    from every train row the log-density keeps falling (log-sum-exp), so atypical inputs
    stay ordered instead of tying at -inf. A NaN statistic gives NaN; +-inf, -inf.
    """
    h = scott_bandwidth(stats.n)
    n_rows = len(np.asarray(rows[stats.names[0]]))
    total = np.zeros(n_rows)
    norm = math.log(h) + 0.5 * math.log(2 * math.pi)

    def log_kernel_mean(d):
        return _log_mean_exp(-0.5 * d * d)

    for j, name in enumerate(stats.names):
        t = (np.asarray(rows[name], float) - stats.mean[j]) / stats.std[j]  # [N]
        out = _on_grid(t, stats.train[:, j], h, log_kernel_mean, 1)[:, 0]
        out[np.isinf(t)] = -np.inf  # infinitely far from every train row
        total += out - norm - math.log(stats.std[j])
    return total


def _log_tail(d: np.ndarray) -> np.ndarray:
    """log mean_i Phi(d[:, i]) per row of ``d`` ([m, n] kernel distances): a KDE's lower
    tail probability, in log space where Phi underflows (far beyond every train row), so
    the tail keeps falling instead of reaching 0. The upper tail is _log_tail(-d), from
    the kernels' upper tails: 1 - F would lose its digits."""
    from scipy.special import log_ndtr, ndtr

    with np.errstate(divide="ignore"):
        out = np.log(np.mean(ndtr(d), axis=1))
    deep = (out < -600.0) & ~np.isnan(d).any(axis=1)
    if deep.any():
        out[deep] = _log_mean_exp(log_ndtr(d[deep]))
    return out


def _log_tails(d: np.ndarray) -> np.ndarray:
    """[m, 2]: log F and log (1 - F) per row, F a KDE's CDF."""
    return np.stack([_log_tail(d), _log_tail(-d)], axis=1)


def kde_log_two_sided_p(stats: Statistics, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """log p_j(x) per row and statistic ([N, d]): the two-sided tail probability
    p_j = 2 min(F_j(t_j), 1 - F_j(t_j)) of statistic j under its KDE (the same KDE as
    :func:`kde_log_density`; F_j, a mean of Gaussian CDFs), at most 1. Computed in log
    space where it underflows, so beyond the last train row p_j keeps falling instead of
    reaching 0; NaN stays NaN."""
    h = scott_bandwidth(stats.n)
    n_rows = len(np.asarray(rows[stats.names[0]]))
    out = np.empty((n_rows, len(stats.names)))
    for j, name in enumerate(stats.names):
        t = (np.asarray(rows[name], float) - stats.mean[j]) / stats.std[j]  # [N]
        tails = _on_grid(t, stats.train[:, j], h, _log_tails, 2)  # [N, 2]
        out[:, j] = math.log(2) + np.min(tails, axis=1)
    return np.minimum(out, 0.0)


def min_p(log_p: np.ndarray) -> np.ndarray:
    """Tippett's combination: min_j log p_j per row ([N, d] -> [N]), NaN when any is NaN.
    An input is as atypical as its most atypical statistic."""
    return np.min(log_p, axis=1)


@dataclass(frozen=True)
class OneClassSVM:
    """A one-class SVM fitted on standardised statistics."""

    stats: Statistics
    model: object  # sklearn.svm.OneClassSVM


def fit_svm(stats: Statistics) -> OneClassSVM:
    """RBF one-class SVM on the standardised train rows: gamma = 1/d (scikit-learn's
    "scale" for unit-variance features), nu = :data:`SVM_NU`. Deterministic (libsvm)."""
    from sklearn.svm import OneClassSVM as SVM

    d = stats.train.shape[1]
    return OneClassSVM(stats, SVM(kernel="rbf", gamma=1.0 / d, nu=SVM_NU).fit(stats.train))


def svm_score(svm: OneClassSVM, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """The SVM's signed distance to its boundary per row ([N]), higher = inside; -inf
    for a row with an infinite statistic, NaN for one with a NaN statistic."""
    n_rows = len(np.asarray(rows[svm.stats.names[0]]))
    step = _chunk_rows(len(svm.model.support_))
    out = np.empty(n_rows)
    for start in range(0, n_rows, step):
        x = svm.stats.standardise(rows, start, start + step)  # [chunk, d]
        ok = np.isfinite(x).all(axis=1)
        chunk = np.where(np.isnan(x).any(axis=1), np.nan, -np.inf)
        if ok.any():
            chunk[ok] = svm.model.decision_function(x[ok])
        out[start:start + len(x)] = chunk
    return out
