"""The contrast sweep: mean bits/dim of each data set against the contrast factor ALPHA.

Nalisnick et al. (2019), docs/paper.md point 4: for a flow with negative curvature the
set with the smaller per-channel variance gets the higher likelihood. ``contrast=ALPHA``
(:mod:`ood_audit.data.transforms`) scales each image's spread around its mean by ALPHA,
its variance by about ALPHA^2, so the analysis predicts mean bits/dim to **increase**
monotonically with ALPHA. The untransformed rows are the point ALPHA = 1 (an explicit
``contrast=1`` takes its place when scored).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..analysis import tables
from ..data.transforms import contrast_factor


def contrast_sweep(df: pd.DataFrame) -> list[dict] | None:
    """One record per data set (in-distribution test, each OOD set) with a contrast sweep:
    ``{"set", "role", "alphas", "mean_bpd", "n", "monotone", "as_predicted"}``; None when
    the scores hold no ``contrast=ALPHA`` rows.

    ``monotone``: "increasing", "decreasing", "flat" or "no" (mean bits/dim in ALPHA
    order); ``as_predicted``: True when it never decreases as ALPHA grows, and rises.
    """
    alpha = df["transform"].map(contrast_factor)
    if not ((df["transform"] != "none") & alpha.notna()).any():
        return None
    rows = df[alpha.notna() & ((df["role"] == "ood") | (df["split"] == "test"))]
    out = []
    for (dataset, role, split), g in rows.groupby(["dataset", "role", "split"], sort=False):
        by_alpha: dict[float, tuple[float, int]] = {}
        for transform, t in g.groupby("transform", sort=False):
            a = float(contrast_factor(transform))
            if transform == "none" and a in by_alpha:
                continue  # an explicit contrast=1 wins
            bpd = t["bpd"].to_numpy(float)
            bpd = bpd[np.isfinite(bpd)]
            by_alpha[a] = (float(bpd.mean()) if bpd.size else float("nan"), int(bpd.size))
        if len(by_alpha) < 2:
            continue
        alphas = sorted(by_alpha)
        means = [by_alpha[a][0] for a in alphas]
        out.append({"set": f"{tables.set_label(dataset, 'none')} {split}", "dataset": dataset,
                    "role": role, "alphas": alphas, "mean_bpd": means,
                    "n": [by_alpha[a][1] for a in alphas], **_trend(means)})
    in_first = sorted(out, key=lambda r: r["role"] != "in")
    return in_first or None


def _trend(means: list[float]) -> dict:
    d = np.diff(np.asarray(means, float))
    if not np.all(np.isfinite(d)):
        return {"monotone": "no", "as_predicted": False}
    if np.all(d == 0):
        word = "flat"
    elif np.all(d >= 0):
        word = "increasing"
    elif np.all(d <= 0):
        word = "decreasing"
    else:
        word = "no"
    return {"monotone": word, "as_predicted": word == "increasing"}
