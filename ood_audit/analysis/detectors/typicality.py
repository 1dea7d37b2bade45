"""The typicality test, one input at a time (the batch test is in the report)."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, TrainRows
from ...scoring.schema import ENTROPY_KEY
from .. import typicality as typ
from .base import Detector, Rows


def entropy(train: Rows, meta: object = None) -> float:
    """H_hat = mean -log p(x) over the in-distribution train rows."""
    return typ.entropy_estimate(train["log_px"])


def typicality(rows: Rows, entropy: float) -> np.ndarray:
    """-| -log p(x) - H_hat |, H_hat = mean -log p(x) of the in-distribution train rows:
    0 for a perfectly typical input.

    An input is atypical when its -log p(x) is far from the entropy of the model's
    distribution, whether it is less likely or, as an MNIST digit under a FashionMNIST
    model, more likely than the model's own data.

    Paper: Nalisnick, Matsukawa, Teh & Lakshminarayanan 2019, "Detecting
    Out-of-Distribution Inputs to Deep Generative Models Using Typicality".
    Needs: in-distribution train rows (score --train-limit, default 2000; --held-out for
    train images the model never saw).
    """
    return typ.typicality_score(rows["log_px"], entropy)


DETECTOR = Detector(
    "typicality", typicality,
    needs=(Columns(), TrainRows(purpose="to estimate the entropy")),
    prepare=entropy,
    describe_fitted=lambda h: {ENTROPY_KEY: f"{h:.6g}"},
)
