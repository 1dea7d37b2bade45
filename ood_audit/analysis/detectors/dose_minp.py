"""DoSE's statistics combined by their most atypical one (Tippett's min-p): the rule for
every OOD set at once, fixed in advance, fitted on held-out in-distribution rows only."""

from __future__ import annotations

import numpy as np

from ...scoring.needs import Columns, DataFeature, HeldOutTrainRows
from .. import density_of_states as dos
from .base import Detector, Rows
from .complexity import FEATURE
from .dose import describer
from .dose_complexity import WithComplexity
from .dose_complexity import fit as fit_with_complexity


def dose_minp(rows: Rows, fitted: dos.Statistics) -> np.ndarray:
    """min_j log p_j(x), p_j = 2 min(F_j, 1 - F_j) the two-sided tail probability of
    statistic j under its Gaussian KDE F_j fitted on held-out in-distribution train rows
    (bandwidth n^(-1/5) sd, Scott), over the statistics of dose-complexity: log p(x), the
    model's terms and totals, and input complexity L(x) - bits_model(x) (PNG).

    Tippett's combination of one typicality test per statistic: an input is as atypical
    as its most atypical statistic. Different OOD sets are carried by different
    statistics (on the FashionMNIST demo Glow: noise by log p(x), a constant image by the
    last level's log p(z), an MNIST digit by input complexity alone); a sum of
    log-densities (dose, dose-complexity) averages the one that carries a set away among
    the others, the minimum does not. The rule (statistics, bandwidth,
    minimum) is fixed in advance: nothing is chosen or weighted on OOD data.

    Paper: after Morningstar et al. 2021, "Density of States Estimation for
    Out-of-Distribution Detection" (AISTATS), with Serra et al. 2020's input complexity
    (ICLR) and Tippett's (1931) minimum-p combination.
    Needs: held-out in-distribution train rows (score --held-out, on a run trained with
    --limit N); the PNG length is computed while scoring.
    """
    return dos.min_p(dos.kde_log_two_sided_p(fitted, WithComplexity(rows)))


DETECTOR = Detector(
    "dose-minp", dose_minp,
    needs=(Columns(("log_px", "bpd", "n_dims")),
           HeldOutTrainRows(purpose="to fit the density of states on"), DataFeature(FEATURE)),
    prepare=fit_with_complexity,
    describe_fitted=describer("dose_minp"),
)
