"""OOD-detection metrics with bootstrap confidence intervals: one module, reused everywhere.

Convention (OpenOOD's, and Nalisnick et al. 2019's): **in-distribution is the positive
class** and **a higher score means "more in-distribution"** (log p(x), or -bits/dim).
So AUROC is P(score_in > score_ood) + 1/2 P(tie); AUROC < 0.5 means the model ranks the
OOD set as *more* in-distribution than its own test data (the paper's paradox).

- ``auroc``: area under the ROC curve (sklearn ``roc_auc_score``; ties count 1/2).
- ``aupr_in``: average precision with in-distribution positive, score as given.
- ``aupr_out``: average precision with OOD positive and the score negated.
- ``fpr95``: FPR at 95% TPR. Sweep the threshold t down over the distinct scores; accept
  every sample with score >= t; t is the *largest* value at which at least 95% of the
  in-distribution samples are accepted (the first point of sklearn's un-thinned
  ``roc_curve`` with tpr >= 0.95). fpr95 is the fraction of OOD samples with score >= t,
  so OOD samples tied with t count as accepted (the pessimistic choice).
- ``share_above_median``: fraction of OOD samples whose score is strictly above the
  median in-distribution score. For the ``likelihood`` detector this is the share of OOD
  images given higher log p(x) than the typical in-distribution image (0.5 = no
  separation; near 1 = the paradox).

Each metric comes with a percentile bootstrap 95% interval (``<metric>_ci_low``,
``<metric>_ci_high``): in- and OOD samples are resampled independently, ``n_boot``
times. The bootstrap is vectorised: a block of resamples is a matrix of draw counts per
sample, and every metric follows from running totals over the once-sorted scores
(O(n) per resample, no re-sorting); blocks run on several threads. Copies of one drawn
sample count as distinct samples, as distinct samples do in the point estimate.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import ReportConfig
from ..errors import UserError

#: The metrics :func:`ood_metrics` returns, each with ``_ci_low``/``_ci_high``.
METRICS: dict[str, str] = {
    "auroc": "AUROC (in-distribution positive; 0.5 = chance, < 0.5 = model prefers OOD)",
    "aupr_in": "AUPR with in-distribution as positive",
    "aupr_out": "AUPR with OOD as positive (score negated)",
    "fpr95": "fraction of OOD accepted at the threshold keeping 95% of in-distribution",
    "share_above_median": "fraction of OOD scored above the in-distribution median",
}
TPR_LEVEL = 0.95
_BOOT_CHUNK = 32  # resamples per vectorised block: bounds memory at ~chunk * n floats


def _clean(scores, what: str) -> np.ndarray:
    """A 1-D float array; NaN is an error, +-inf kept in order but made finite.

    sklearn rejects infinities, yet log p(x) = -inf is a legitimate "very unlikely", so
    infinities are mapped just beyond the finite range, which keeps every ranking.
    """
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 0:
        raise UserError(f"no {what} scores to compare: is that data set empty?")
    if np.isnan(arr).any():
        raise UserError(f"{int(np.isnan(arr).sum())} {what} score(s) are NaN; rescore or drop them")
    return arr


def _finite(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = np.concatenate([a, b])
    fin = both[np.isfinite(both)]
    lo, hi = (fin.min(), fin.max()) if fin.size else (0.0, 0.0)
    span = max(hi - lo, 1.0)

    def fix(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x[x == np.inf] = hi + span
        x[x == -np.inf] = lo - span
        return x

    return fix(a), fix(b)


def fpr_at_tpr(score_in, score_ood, tpr_level: float = TPR_LEVEL) -> float:
    """Fraction of OOD samples with score >= t, t the largest threshold keeping tpr_level of in.

    Same rule as the module docstring; computed with sklearn's ``roc_curve`` (no point
    thinning, which could skip the first point reaching the level).
    """
    from sklearn.metrics import roc_curve  # lazy: keeps CLI start-up fast
    s_in, s_ood = _finite(_clean(score_in, "in-distribution"), _clean(score_ood, "OOD"))
    y = np.r_[np.ones(s_in.size), np.zeros(s_ood.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_ood], drop_intermediate=False)
    # tpr values are k / n_in: compare in integers so 0.95 * n_in has no rounding slack.
    hit = np.rint(tpr * s_in.size) >= tpr_level * s_in.size - 1e-9
    return float(fpr[np.argmax(hit)])


def share_ood_above_in_median(score_in, score_ood) -> float:
    """Fraction of OOD scores strictly above the median in-distribution score."""
    s_in, s_ood = _clean(score_in, "in-distribution"), _clean(score_ood, "OOD")
    return float(np.mean(s_ood > np.median(s_in)))


def ood_metrics(score_in, score_ood, *, n_boot: int = ReportConfig.n_boot, seed: int = 0,
                ci: float = 0.95) -> dict[str, float | int]:
    """All metrics of :data:`METRICS` for one detector and one OOD set, with bootstrap CIs.

    Returns a flat dict: ``auroc``, ``auroc_ci_low``, ``auroc_ci_high``, ... for every
    metric, plus ``n_in``, ``n_ood``, ``n_boot``. ``n_boot=0`` gives NaN intervals.
    Point estimates come from scikit-learn; the bootstrap from :func:`_metrics_from_weights`
    (tested equal to scikit-learn on resampled data). Empty or NaN input raises UserError;
    ``seed`` makes the intervals reproducible.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score  # lazy: keeps CLI start-up fast
    s_in, s_ood = _clean(score_in, "in-distribution"), _clean(score_ood, "OOD")
    s_in, s_ood = _finite(s_in, s_ood)
    y = np.r_[np.ones(s_in.size), np.zeros(s_ood.size)]
    s = np.r_[s_in, s_ood]
    point = {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr95": fpr_at_tpr(s_in, s_ood),
        "share_above_median": share_ood_above_in_median(s_in, s_ood),
    }
    out: dict[str, float | int] = {}
    boot = _bootstrap(s_in, s_ood, n_boot, seed) if n_boot > 0 else None
    alpha = (1.0 - ci) / 2.0
    for name, value in point.items():
        out[name] = value
        if boot is None:
            out[f"{name}_ci_low"] = out[f"{name}_ci_high"] = float("nan")
        else:
            lo, hi = np.quantile(boot[name], [alpha, 1.0 - alpha])
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(lo), float(hi)
    out.update(n_in=int(s_in.size), n_ood=int(s_ood.size), n_boot=int(n_boot))
    return out


class _Sorted:
    """Both samples sorted by descending score, with the positions every metric needs.

    A threshold t accepts every sample with score >= t, so each position counts samples
    with a score >= (or >) a given one; ties are thereby treated as sklearn treats them.
    Positions that form a plain range (no ties) are kept as slices: a view, not a gather.
    """

    def __init__(self, s_in: np.ndarray, s_ood: np.ndarray):
        self.s_in = np.sort(s_in)[::-1].copy()   # [n_in], descending
        self.s_ood = np.sort(s_ood)[::-1].copy()  # [n_ood], descending
        neg_in, neg_ood = -self.s_in, -self.s_ood  # ascending, for searchsorted

        def pos(neg_sorted: np.ndarray, s: np.ndarray, ge: bool) -> np.ndarray:
            return np.searchsorted(neg_sorted, -s, side="right" if ge else "left")

        in_ge_in, in_gt_in = pos(neg_in, self.s_in, True), pos(neg_in, self.s_in, False)
        ood_ge_in, ood_gt_in = pos(neg_ood, self.s_in, True), pos(neg_ood, self.s_in, False)
        in_ge_ood, in_gt_ood = pos(neg_in, self.s_ood, True), pos(neg_in, self.s_ood, False)
        ood_ge_ood, ood_gt_ood = pos(neg_ood, self.s_ood, True), pos(neg_ood, self.s_ood, False)
        self.in_ge_in = _compact(in_ge_in)      # in with score >= s_in[i]
        self.ood_ge_in = _compact(ood_ge_in)    # OOD with score >= s_in[i]
        self.in_gt_ood = _compact(in_gt_ood)    # in with score > s_ood[j]
        self.in_ge_ood = _compact(in_ge_ood)    # in with score >= s_ood[j]
        self.ood_gt_ood = _compact(ood_gt_ood)  # OOD with score > s_ood[j]
        self.ties_in_ood = not np.array_equal(in_gt_ood, in_ge_ood)
        # A singleton: no other sample, of either set, shares its score.
        self.single_in = (in_ge_in - in_gt_in == 1) & (ood_ge_in == ood_gt_in)
        self.single_ood = (ood_ge_ood - ood_gt_ood == 1) & (in_ge_ood == in_gt_ood)


def _compact(pos: np.ndarray) -> np.ndarray | slice:
    """A slice when ``pos`` is a plain range (no ties): indexing is then a view."""
    if pos.size and np.array_equal(pos, np.arange(pos[0], pos[0] + pos.size)):
        return slice(int(pos[0]), int(pos[0]) + pos.size)
    return pos


def _at(c: np.ndarray, ix: np.ndarray | slice) -> np.ndarray:
    """Columns ``ix`` of c: a view for a slice, ``np.take`` (faster than fancy indexing) else."""
    return c[:, ix] if isinstance(ix, slice) else np.take(c, ix, axis=1)


def _cum(w: np.ndarray) -> np.ndarray:
    """[B, n+1] running totals with a leading 0: c[:, k] = weight of the first k samples."""
    c = np.zeros((w.shape[0], w.shape[1] + 1), dtype=w.dtype)
    np.cumsum(w, axis=1, out=c[:, 1:])
    return c


def _metrics_from_weights(srt: _Sorted, w_in: np.ndarray,
                          w_ood: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics for B weighted resamples at once.

    ``w_in`` [B, n_in] / ``w_ood`` [B, n_ood]: how often each sample (in ``srt``'s sorted
    order) is drawn; integer counts keep every running total exact. Work is
    O(B * (n_in + n_ood)) in a handful of passes.
    """
    c_in, c_ood = _cum(w_in), _cum(w_ood)
    n_pos, n_neg = c_in[:, -1].astype(float), c_ood[:, -1].astype(float)  # [B]
    # AUROC: every OOD draw scores (in above it + 1/2 in tied with it).
    above = _at(c_in, srt.in_gt_ood)
    pairs = np.einsum("bj,bj->b", w_ood, above).astype(float)
    if srt.ties_in_ood:
        pairs += 0.5 * np.einsum("bj,bj->b", w_ood, _at(c_in, srt.in_ge_ood) - above)
    auroc = pairs / (n_pos * n_neg)
    # AP = sum over positives of the precision at their own score (ties share a block).
    tp, fp = _at(c_in, srt.in_ge_in), _at(c_ood, srt.ood_ge_in)
    aupr_in = _ap_sum(w_in, tp, fp, srt.single_in) / n_pos
    # OOD positive, score negated: counts at or below each OOD score.
    fp_up = c_ood[:, -1:] - _at(c_ood, srt.ood_gt_ood)
    tp_up = c_in[:, -1:] - above
    aupr_out = _ap_sum(w_ood, fp_up, tp_up, srt.single_ood) / n_neg
    # fpr95: the first in-score whose running count reaches 95% is the threshold.
    first = np.argmax(c_in[:, 1:] >= TPR_LEVEL * n_pos[:, None] - 1e-9, 1)
    fpr95 = _ood_at_or_above(srt, c_ood, srt.s_in[first], strict=False) / n_neg
    # Median: the two middle order statistics of the resampled in-set (1-based ranks).
    lo = srt.s_in[np.argmax(c_in[:, 1:] >= ((n_pos + 1) // 2)[:, None], 1)]
    hi = srt.s_in[np.argmax(c_in[:, 1:] >= (n_pos // 2 + 1)[:, None], 1)]
    share = _ood_at_or_above(srt, c_ood, 0.5 * (lo + hi), strict=True) / n_neg
    return {"auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr95": fpr95,
            "share_above_median": share}


def _ap_sum(w: np.ndarray, hits: np.ndarray, misses: np.ndarray, single: np.ndarray) -> np.ndarray:
    """Sum over drawn positives of the precision at their score, per resample [B].

    ``hits`` / ``misses``: positives / negatives accepted at each positive's threshold
    (its whole tie block included). A block of tied *different* samples is one step, as
    in sklearn. But the w copies of one drawn singleton are counted as w distinct
    samples, as the point estimate counts distinct samples: precisions (h+c)/(h+m+c),
    c = 1..w, h the positives above, which sum to w - m * (H(h+m+w) - H(h+m)) with H the
    harmonic numbers. Treating the copies as a tie instead would bias AP upwards (a
    percentile interval could then miss the point estimate).
    """
    n = hits + misses  # int64: exact counts
    if not single.any():
        return (w * hits / np.maximum(n, 1)).sum(1)
    harmonic = _harmonic(int(n.max()))
    gain = harmonic[n]
    gain -= harmonic[n - w]  # H(h+m+w) - H(h+m), in place: this is the hot loop
    if single.all():
        return w.sum(1) - np.einsum("bi,bi->b", misses, gain)
    steps = w - misses * gain
    return np.where(single[None, :], steps, w * hits / np.maximum(n, 1)).sum(1)


def _harmonic(n: int) -> np.ndarray:
    """H[k] = 1 + 1/2 + ... + 1/k for k = 0..n (a table beats digamma by ~10x here)."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def _ood_at_or_above(srt: _Sorted, c_ood: np.ndarray, t: np.ndarray, strict: bool) -> np.ndarray:
    """Per resample b, the OOD weight with score >= t[b] (> t[b] when strict)."""
    k = np.searchsorted(-srt.s_ood, -t, side="left" if strict else "right")
    return c_ood[np.arange(c_ood.shape[0]), k].astype(float)


def _bootstrap(s_in: np.ndarray, s_ood: np.ndarray, n_boot: int,
               seed: int) -> dict[str, np.ndarray]:
    """``n_boot`` percentile-bootstrap replicates of every metric, in blocks of resamples.

    Each block draws from its own generator spawned from ``seed``, so the result does not
    depend on how blocks are spread over threads (numpy releases the GIL in the heavy
    array operations, so blocks run in parallel on several cores).
    """
    srt = _Sorted(s_in, s_ood)
    starts = list(range(0, n_boot, _BOOT_CHUNK))
    seeds = np.random.SeedSequence(seed).spawn(len(starts))

    def block(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seeds[i])
        b = min(_BOOT_CHUNK, n_boot - starts[i])
        # Drawing positions in the sorted arrays is the same as drawing samples.
        w_in = _resample_counts(rng, s_in.size, b)
        w_ood = _resample_counts(rng, s_ood.size, b)
        return _metrics_from_weights(srt, w_in, w_ood)

    workers = min(len(starts), os.cpu_count() or 1, 4)
    if workers > 1 and s_in.size + s_ood.size > 2000:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(block, range(len(starts))))
    else:
        parts = [block(i) for i in range(len(starts))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _resample_counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """[b, n] int64 counts of b with-replacement resamples of n items."""
    idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def weighted_replicates(score_in, score_ood, w_in, w_ood) -> dict[str, np.ndarray]:
    """Metrics of B weighted copies of the samples (weights [B, n] in the inputs' order).

    The bootstrap's engine exposed for tests, which compare it with scikit-learn's
    ``sample_weight`` and with explicit resamples.
    """
    s_in, s_ood = np.asarray(score_in, float), np.asarray(score_ood, float)
    o_in, o_ood = np.argsort(-s_in, kind="stable"), np.argsort(-s_ood, kind="stable")
    srt = _Sorted(s_in, s_ood)
    return _metrics_from_weights(srt, np.asarray(w_in, np.int64)[:, o_in],
                                 np.asarray(w_ood, np.int64)[:, o_ood])


def roc_points(score_in, score_ood) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve, in-distribution positive, for plotting."""
    from sklearn.metrics import roc_curve  # lazy: keeps CLI start-up fast
    s_in, s_ood = _finite(_clean(score_in, "in-distribution"), _clean(score_ood, "OOD"))
    fpr, tpr, _ = roc_curve(np.r_[np.ones(s_in.size), np.zeros(s_ood.size)], np.r_[s_in, s_ood])
    return fpr, tpr
