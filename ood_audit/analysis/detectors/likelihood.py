"""The likelihood itself: the detector the paper shows failing."""

from __future__ import annotations

import numpy as np

from .base import Detector, Rows


def likelihood(rows: Rows, fitted: None = None) -> np.ndarray:
    """log p(x) in nats: higher = more in-distribution.

    A deep generative model can give OOD inputs a higher likelihood than its own test
    data (FashionMNIST -> MNIST, CIFAR-10 -> SVHN): AUROC below 0.5.

    Paper: Nalisnick et al. 2019, "Do Deep Generative Models Know What They Don't Know?"
    (ICLR).
    Needs: the scored model only.
    """
    return rows["log_px"]


DETECTOR = Detector("likelihood", likelihood)
