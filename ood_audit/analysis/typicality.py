"""The typicality test (Nalisnick, Matsukawa, Teh & Lakshminarayanan 2019b, "Detecting
Out-of-Distribution Inputs to Deep Generative Models Using Typicality").

A model's typical set holds the inputs whose -log p(x) is close to the entropy H of the
model's distribution; a high-likelihood OOD input (an MNIST digit under a FashionMNIST
model) is *atypical* although it is likely. With H estimated from in-distribution
training data, H_hat = mean over those rows of -log p(x):

- per sample: score(x) = -| -log p(x) - H_hat |  (higher = more typical = more "in");
- per batch of M inputs: eps(x_1..M) = | (1/M) sum_m -log p(x_m) - H_hat |, flagged as
  OOD when eps exceeds the bootstrap threshold eps_alpha^M: the alpha-quantile of eps
  over K batches of M drawn with replacement from in-distribution held-out data.

All quantities are in the units of ``log_px`` (nats of the dequantized density); the
constant D log 256 between that and the discrete code length cancels in every difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from .metrics import ood_metrics

if TYPE_CHECKING:  # tables come in as pandas objects; the detectors' registry imports this
    import pandas as pd  # module, and --help must not load pandas

ALPHA = 0.99  # Nalisnick et al. 2019b: the 99% quantile of the bootstrapped statistic
BATCH_SIZES = (1, 2, 5, 10)
N_BATCHES = 1000


def entropy_rows(df: pd.DataFrame) -> pd.Series:
    """The rows H_hat is estimated on: in-distribution, train split, untransformed, finite."""
    mask = (df["role"] == "in") & (df["split"] == "train") & (df["transform"] == "none")
    log_px = df.loc[mask, "log_px"].astype(float)
    return log_px[np.isfinite(log_px)]


def entropy_estimate(log_px_train) -> float:
    """H_hat = mean of -log p(x) over in-distribution training (or held-out) inputs."""
    v = np.asarray(log_px_train, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        raise UserError("the typicality test needs in-distribution train rows to estimate the "
                        "entropy: rescore with --train-limit N (N >= 2)")
    return float(-v.mean())


def typicality_score(log_px, entropy: float) -> np.ndarray:
    """Per-sample score -| -log p(x) - H_hat |: 0 for a perfectly typical input."""
    return -np.abs(-np.asarray(log_px, dtype=float) - entropy)


def batch_statistic(log_px_batches, entropy: float) -> np.ndarray:
    """eps for each batch: | mean_m -log p(x_m) - H_hat |; ``log_px_batches`` is [K, M]."""
    b = np.asarray(log_px_batches, dtype=float)
    return np.abs(-b.mean(axis=-1) - entropy)


def draw_batches(log_px, size: int, n_batches: int, rng: np.random.Generator) -> np.ndarray:
    """[n_batches, size] values drawn with replacement from ``log_px``."""
    v = np.asarray(log_px, dtype=float)
    return v[rng.integers(0, len(v), (n_batches, size))]


def bootstrap_threshold(log_px_heldout, entropy: float, size: int, *, alpha: float = ALPHA,
                        n_batches: int = N_BATCHES, seed: int = 0) -> float:
    """eps_alpha^M: the ``alpha``-quantile of eps over ``n_batches`` bootstrap batches of
    ``size`` in-distribution inputs (Nalisnick et al. 2019b, Algorithm 1)."""
    rng = np.random.default_rng([seed, size])
    eps = batch_statistic(draw_batches(log_px_heldout, size, n_batches, rng), entropy)
    return float(np.quantile(eps, alpha))


def batch_table(log_px_train, log_px_in, ood: dict[str, np.ndarray], *,
                sizes=BATCH_SIZES, alpha: float = ALPHA, n_batches: int = N_BATCHES,
                seed: int = 0) -> list[dict]:
    """The batch test on each OOD set, one row per (set, M).

    H_hat and the threshold come from ``log_px_train``; ``n_batches`` batches of M are
    drawn (with replacement) from the in-distribution test inputs and from the OOD set.
    Row keys: ood_set, batch_size, threshold, in_flagged (false alarms), ood_flagged
    (detection rate), auroc (of -eps, in-distribution batches positive).
    """
    entropy = entropy_estimate(log_px_train)
    rows = []
    for i, (label, values) in enumerate(ood.items()):
        for m in sizes:
            threshold = bootstrap_threshold(log_px_train, entropy, m, alpha=alpha,
                                            n_batches=n_batches, seed=seed)
            rng = np.random.default_rng([seed, m, 1])  # the same in-distribution batches
            eps_in = batch_statistic(draw_batches(log_px_in, m, n_batches, rng), entropy)
            rng_ood = np.random.default_rng([seed, m, 2, i])
            eps_ood = batch_statistic(draw_batches(values, m, n_batches, rng_ood), entropy)
            rows.append({
                "ood_set": label, "batch_size": int(m), "threshold": threshold,
                "in_flagged": float((eps_in > threshold).mean()),
                "ood_flagged": float((eps_ood > threshold).mean()),
                "auroc": float(ood_metrics(-eps_in, -eps_ood, n_boot=0)["auroc"]),
            })
    return rows
