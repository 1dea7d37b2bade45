"""DoSE with a one-class SVM over the model's own statistics (Morningstar et al. 2021)."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, HeldOutTrainRows
from .. import density_of_states as dos
from .base import Detector, Rows
from .dose import model_statistics


def fit(train: Rows, meta) -> dos.OneClassSVM:
    """A one-class SVM on the model's statistics of the held-out train rows."""
    return dos.fit_svm(model_statistics(train, meta))


def dose_svm(rows: Rows, fitted: dos.OneClassSVM) -> np.ndarray:
    """Signed distance to a one-class SVM's boundary (RBF kernel, gamma = 1/d, nu = 0.1)
    fitted on the model's d statistics (those of dose), standardised on held-out
    in-distribution train rows: positive inside.

    The joint vector of statistics, where dose takes each on its own: an input whose
    log p(z) and log|det| are each typical but not together is outside. Far outside,
    the distance stops falling (the kernel vanishes), so very atypical inputs tie.

    Paper: Morningstar et al. 2021, "Density of States Estimation for Out-of-Distribution
    Detection" (AISTATS).
    Needs: held-out in-distribution train rows (score --held-out, on a run trained with
    --limit N).
    """
    return dos.svm_score(fitted, rows)


DETECTOR = Detector(
    "dose-svm", dose_svm,
    needs=(Columns(), HeldOutTrainRows(purpose="to fit the one-class SVM on")),
    prepare=fit,
)
