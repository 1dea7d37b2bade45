"""OOD metrics against hand-computed cases, scikit-learn, and a naive bootstrap."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ood_audit.analysis.metrics import (
    METRICS,
    fpr_at_tpr,
    ood_metrics,
    share_ood_above_in_median,
    weighted_replicates,
)
from ood_audit.errors import UserError


def naive_fpr95(s_in, s_ood):
    """The documented rule, written independently: the threshold is the k-th highest
    in-distribution score, k = ceil(0.95 n); OOD with score >= it are accepted."""
    s_in = np.sort(np.asarray(s_in, float))[::-1]
    k = math.ceil(0.95 * len(s_in) - 1e-9)
    return float(np.mean(np.asarray(s_ood) >= s_in[k - 1]))


# ------------------------------------------------------------------ hand-computed cases

def test_auroc_hand_case():
    # Pairs (in > ood): 1 beats 0.5; 2 beats 0.5,1.5; 3 beats 3; 4 beats 4 -> 10 of 16.
    m = ood_metrics([1, 2, 3, 4], [0.5, 1.5, 2.5, 3.5], n_boot=0)
    assert m["auroc"] == pytest.approx(10 / 16)


def test_auroc_ties_count_half():
    # in=1 vs ood=1: tie (1/2), in=1 vs ood=0: win (1); twice -> 3/4.
    assert ood_metrics([1, 1], [1, 0], n_boot=0)["auroc"] == pytest.approx(0.75)


def test_identical_distributions_give_exactly_one_half():
    s = [1.0, 2.0, 3.0, 3.0, 5.0, 8.0]
    m = ood_metrics(s, s, n_boot=200)
    assert m["auroc"] == 0.5
    assert m["auroc_ci_low"] <= 0.5 <= m["auroc_ci_high"]


def test_direction_convention_in_distribution_is_positive():
    high, low = [10.0, 11.0, 12.0], [1.0, 2.0, 3.0]
    good = ood_metrics(high, low, n_boot=0)  # in-distribution scored higher: perfect
    assert (good["auroc"], good["aupr_in"], good["aupr_out"], good["fpr95"]) == (1, 1, 1, 0)
    assert good["share_above_median"] == 0
    bad = ood_metrics(low, high, n_boot=0)  # the paradox: OOD scored higher
    assert bad["auroc"] == 0 and bad["fpr95"] == 1 and bad["share_above_median"] == 1


def test_aupr_hand_case():
    # in=[4,3,1], ood=[2,0]. Descending: 4i 3i 2o 1i 0o.
    # AUPR-In: recall steps 1/3 at precision 1, 1, then 3/4 -> (1 + 1 + 3/4) / 3 = 11/12.
    # AUPR-Out (OOD positive, ascending): 0o (P=1), 1i, 2o (P=2/3) -> (1 + 2/3) / 2 = 5/6.
    m = ood_metrics([4, 3, 1], [2, 0], n_boot=0)
    assert m["aupr_in"] == pytest.approx(11 / 12)
    assert m["aupr_out"] == pytest.approx(5 / 6)
    assert m["auroc"] == pytest.approx(5 / 6)  # ood=2 below 2 of 3, ood=0 below 3 of 3


def test_fpr95_hand_cases_and_ties():
    s_in = np.arange(1, 21, dtype=float)  # keeping 19 of 20 puts the threshold at 2
    assert fpr_at_tpr(s_in, [0.5, 2.5, 10.5, 30]) == pytest.approx(3 / 4)
    # An OOD score equal to the threshold is accepted (score >= t).
    assert fpr_at_tpr(s_in, [2.0, 1.5, 50.0]) == pytest.approx(2 / 3)
    # With 10 in-samples, 95% needs all 10: the threshold is the lowest in-score.
    assert fpr_at_tpr(np.arange(1, 11.0), [0.5, 1.0, 5.0]) == pytest.approx(2 / 3)
    # Tied in-scores at the threshold all count as accepted.
    assert fpr_at_tpr([5, 5, 5, 5, 1], [4.0, 5.0, 0.0]) == pytest.approx(2 / 3)


def test_share_above_median_hand_case():
    # Median of [1,2,3,4] is 2.5; strictly above it: only 3.
    assert share_ood_above_in_median([1, 2, 3, 4], [2.5, 3, 0]) == pytest.approx(1 / 3)


def test_point_estimates_equal_sklearn_and_independent_rules():
    rng = np.random.default_rng(3)
    s_in = np.round(rng.normal(0, 1, 400), 1)  # rounding makes many ties
    s_ood = np.round(rng.normal(0.4, 1.3, 300), 1)
    m = ood_metrics(s_in, s_ood, n_boot=0)
    y = np.r_[np.ones(400), np.zeros(300)]
    s = np.r_[s_in, s_ood]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert m["fpr95"] == pytest.approx(naive_fpr95(s_in, s_ood))
    assert m["share_above_median"] == pytest.approx(np.mean(s_ood > np.median(s_in)))
    assert (m["n_in"], m["n_ood"]) == (400, 300)
    assert math.isnan(m["auroc_ci_low"])  # n_boot=0: no interval


# ------------------------------------------------------------------ the bootstrap engine

def _jittered_repeat(x, w, single):
    """Repeat x[i] w[i] times; copies of a singleton get tiny increasing offsets, so
    scikit-learn sees them as distinct samples (the engine's documented rule)."""
    out = []
    for xi, wi, si in zip(x, w, single, strict=True):
        out += [xi + (k * 1e-9 if si else 0.0) for k in range(wi)]
    return np.array(out)


@pytest.mark.parametrize("decimals", [None, 1])
def test_weighted_replicates_equal_sklearn_on_resampled_data(decimals):
    rng = np.random.default_rng(5)
    s_in, s_ood = rng.normal(0, 1, 120), rng.normal(0.3, 1, 90)
    if decimals is not None:
        s_in, s_ood = np.round(s_in, decimals), np.round(s_ood, decimals)
    values, counts = np.unique(np.r_[s_in, s_ood], return_counts=True)
    single = dict(zip(values, counts == 1, strict=True))
    w_in, w_ood = rng.integers(0, 4, (6, 120)), rng.integers(0, 4, (6, 90))
    got = weighted_replicates(s_in, s_ood, w_in, w_ood)
    for b in range(6):
        a = _jittered_repeat(s_in, w_in[b], [single[x] for x in s_in])
        o = _jittered_repeat(s_ood, w_ood[b], [single[x] for x in s_ood])
        y, s = np.r_[np.ones(a.size), np.zeros(o.size)], np.r_[a, o]
        assert got["auroc"][b] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
        assert got["aupr_in"][b] == pytest.approx(average_precision_score(y, s), abs=1e-9)
        assert got["aupr_out"][b] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-9)
        assert got["fpr95"][b] == pytest.approx(naive_fpr95(a, o))
        assert got["share_above_median"][b] == pytest.approx(np.mean(o > np.median(a)))


def test_bootstrap_interval_matches_a_naive_bootstrap():
    rng = np.random.default_rng(11)
    s_in, s_ood = rng.normal(0, 1, 500), rng.normal(0.5, 1, 500)
    m = ood_metrics(s_in, s_ood, n_boot=1000, seed=1)
    naive = []
    for _ in range(250):
        a, o = rng.choice(s_in, s_in.size), rng.choice(s_ood, s_ood.size)
        naive.append(roc_auc_score(np.r_[np.ones(a.size), np.zeros(o.size)], np.r_[a, o]))
    lo, hi = np.quantile(naive, [0.025, 0.975])
    assert m["auroc_ci_low"] == pytest.approx(lo, abs=0.015)
    assert m["auroc_ci_high"] == pytest.approx(hi, abs=0.015)
    for name in METRICS:
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], name


def test_bootstrap_is_seeded_and_narrows_with_more_data():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 200), rng.normal(0.5, 1, 200)
    assert ood_metrics(a, b, seed=4) == ood_metrics(a, b, seed=4)
    assert ood_metrics(a, b, seed=4)["auroc_ci_low"] != ood_metrics(a, b, seed=5)["auroc_ci_low"]
    big = ood_metrics(rng.normal(0, 1, 5000), rng.normal(0.5, 1, 5000), n_boot=300)
    small = ood_metrics(a, b, n_boot=300)
    width = lambda m: m["auroc_ci_high"] - m["auroc_ci_low"]  # noqa: E731
    assert width(big) < width(small)


def test_bootstrap_is_fast_on_10k_samples():
    rng = np.random.default_rng(0)
    s_in = rng.normal(0, 1, 10_000)
    start = time.perf_counter()
    for shift in (0.3, -1.0):  # two OOD sets
        ood_metrics(s_in, rng.normal(shift, 1, 10_000), n_boot=1000)
    # ~1 s on an idle 2-core machine; the loose bound only catches an O(n^2) slip.
    assert time.perf_counter() - start < 15


# ------------------------------------------------------------------ bad input

def test_empty_and_nan_input_are_user_errors():
    with pytest.raises(UserError, match="no OOD scores"):
        ood_metrics([1.0, 2.0], [])
    with pytest.raises(UserError, match="in-distribution"):
        ood_metrics([], [1.0])
    with pytest.raises(UserError, match="NaN"):
        ood_metrics([1.0, float("nan")], [0.0])


def test_infinite_scores_keep_their_rank():
    # log p(x) = -inf is "very unlikely": it must rank below every finite score.
    m = ood_metrics([1.0, 2.0, 3.0], [-np.inf, 0.5, np.inf], n_boot=50)
    assert m["auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0, 0], [1, 2, 3, -1e9, 0.5, 1e9]))
