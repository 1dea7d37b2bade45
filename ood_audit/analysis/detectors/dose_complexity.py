"""DoSE over the model's statistics and Serra et al.'s input complexity: one rule for
every OOD set, fixed before any was scored."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ...scoring.needs import Columns, DataFeature, HeldOutTrainRows
from .. import density_of_states as dos
from .base import Detector, Rows
from .complexity import FEATURE, complexity_score
from .dose import describer, model_statistics

#: The derived statistic's name: L(x) - bits_model(x), the complexity detector's score.
COMPLEXITY = "input_complexity"


class WithComplexity(Mapping):
    """A table's rows plus the statistic ``input_complexity`` = PNG bits - bpd * D,
    computed when read."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __getitem__(self, key: str) -> np.ndarray:
        if key == COMPLEXITY:
            return complexity_score(self.rows["bpd"], self.rows["n_dims"], self.rows[FEATURE])
        return self.rows[key]

    def __iter__(self):
        return iter([*self.rows, COMPLEXITY])

    def __len__(self) -> int:
        return len(self.rows) + 1


def fit(train: Rows, meta) -> dos.Statistics:
    """dose's statistics plus input complexity, standardised on the held-out train rows."""
    return model_statistics(WithComplexity(train), meta, extra=(COMPLEXITY,))


def dose_complexity(rows: Rows, fitted: dos.Statistics) -> np.ndarray:
    """sum_j log KDE_j(t_j(x)) over dose's statistics plus input complexity L(x) -
    bits_model(x) (L = PNG length in bits, Serra et al.'s S(x) negated), each a Gaussian
    KDE fitted on held-out in-distribution train rows, bandwidth n^(-1/5) sd (Scott).

    The likelihood's statistics place noise and constant images far outside the held-out
    rows (far too unlikely, far too likely); an MNIST digit is as likely as a garment but
    much simpler to compress, which input complexity measures. Every statistic is taken,
    none chosen or weighted on OOD data; this rule was fixed before any OOD set was scored
    with it.

    Paper: Morningstar et al. 2021, "Density of States Estimation for Out-of-Distribution
    Detection" (AISTATS), with the statistic of Serra et al. 2020, "Input Complexity and
    Out-of-Distribution Detection with Likelihood-based Generative Models" (ICLR).
    Needs: held-out in-distribution train rows (score --held-out, on a run trained with
    --limit N); the PNG length is computed while scoring.
    """
    return dos.kde_log_density(fitted, WithComplexity(rows))


DETECTOR = Detector(
    "dose-complexity", dose_complexity,
    needs=(Columns(("log_px", "bpd", "n_dims")),
           HeldOutTrainRows(purpose="to fit the density of states on"), DataFeature(FEATURE)),
    prepare=fit,
    describe_fitted=describer("dose_complexity"),
)
