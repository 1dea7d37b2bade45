"""Havtorn et al.'s likelihood ratio of a hierarchical VAE: the full bound against L^>k."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, SkipBounds, TrainRows, skip_columns
from ...scoring.schema import SKIP_PREFIX
from .base import Detector, Rows

#: ScoresMeta.extra key: the k the llr-k detector chose on the in-distribution train rows.
K_KEY = "llr_k"


def llr(rows: Rows, k: int) -> np.ndarray:
    """LLR^>k(x) = L(x) - L^>k(x) per row, in nats."""
    return rows["log_px"] - rows[f"{SKIP_PREFIX}{k}"]


def choose_k(train: Rows, meta: object = None) -> int:
    """k* = argmax_k mean(LLR^>k) / sd(LLR^>k) over the in-distribution train rows (the
    smallest k on a tie). No OOD data is used."""
    best, best_snr = None, -np.inf
    for column in skip_columns(train):
        k = int(column[len(SKIP_PREFIX):])
        values = llr(train, k)
        values = values[np.isfinite(values)]
        sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
        snr = float(values.mean()) / sd if sd > 0 else -np.inf
        if best is None or snr > best_snr:
            best, best_snr = k, snr
    if best is None:
        raise ValueError("no log_px_skip{k} column: not a hierarchical VAE's table")
    return best


def llr_k(rows: Rows, k: int) -> np.ndarray:
    """-LLR^>k = L^>k(x) - L(x): the bound with the k bottom latents drawn from the
    conditional prior p(z_<=k | z_>k) (the top ones inferred) minus the full bound, both
    K-sample importance-weighted on the same draws; k* maximises mean(LLR^>k) /
    sd(LLR^>k) over the in-distribution train rows.

    The bottom latents carry low-level features, which in- and out-of-distribution images
    share and which dominate the likelihood; an image whose top (semantic) latents do not
    predict its low-level ones loses more when they are drawn from the prior: a large
    LLR^>k. k* is the k at which that loss is largest against its own spread on
    in-distribution images.

    Paper: Havtorn, Frellsen, Hauberg & Maaløe 2021, "Hierarchical VAEs Know What They
    Don't Know" (ICML), its bound L^>k and score LLR^>k = L - L^>k.
    Needs: a hierarchical VAE run (--model hvae, its log_px_skip{k} columns) and
    in-distribution train rows to choose k (score --train-limit, default 2000; --held-out
    for train images the model never saw).
    """
    return -llr(rows, k)


DETECTOR = Detector(
    "llr-k", llr_k,
    needs=(Columns(), SkipBounds(), TrainRows(purpose="to choose k")),
    prepare=choose_k,
    describe_fitted=lambda k: {K_KEY: str(k)},
)
