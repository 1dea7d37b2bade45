"""DoSE: a KDE over the model's own per-image statistics (Morningstar et al. 2021)."""

from __future__ import annotations

import json

import numpy as np

from ...errors import UserError
from ...scoring.needs import Columns, HeldOutTrainRows, train_rows_held_out
from ...scoring.schema import totals_for
from .. import density_of_states as dos
from .base import Detector, Rows


def model_statistics(train: Rows, meta, extra: tuple[str, ...] = ()) -> dos.Statistics:
    """The model's statistics (log p(x), the terms listed in the metadata ``terms``, their
    group totals, then ``extra``), standardised on held-out in-distribution train rows.

    Refuses (UserError, one line) rows the model was trained on: a density fitted on
    them describes memorised images, not unseen in-distribution ones.
    """
    if not train_rows_held_out(meta):
        raise UserError("a density of states fitted on the model's own training images would "
                        "leak them into the fit; rescore with --held-out")
    terms = list(meta.terms)
    try:
        return dos.fit_statistics(train, dos.candidate_statistics(terms, list(totals_for(terms)),
                                                                  extra))
    except ValueError as exc:
        raise UserError(f"density of states: {exc}; rescore with --held-out --train-limit N"
                        ) from None


def describer(prefix: str):
    """ScoresMeta.extra entries (set at read time) describing a fitted density of states:
    ``<prefix>_statistics`` (JSON list), ``<prefix>_fit_rows``, ``<prefix>_bandwidth``."""

    def describe(stats: dos.Statistics) -> dict[str, str]:
        return {f"{prefix}_statistics": json.dumps(list(stats.names)),
                f"{prefix}_fit_rows": str(stats.n),
                f"{prefix}_bandwidth": f"{dos.scott_bandwidth(stats.n):.4g} sd (Scott)"}

    return describe


def dose(rows: Rows, fitted: dos.Statistics) -> np.ndarray:
    """sum_j log KDE_j(t_j(x)) over the model's statistics t_j (log p(x), its terms and
    their totals: log p(z) and log|det| per level for a flow, recon / KL / IWAE gain for
    a VAE, per-channel terms for PixelCNN++), each a Gaussian KDE fitted on held-out
    in-distribution train rows, bandwidth n^(-1/5) standard deviations (Scott).

    Not how likely the input is, but how typical its statistics are among in-distribution
    images the model never saw: an MNIST digit's too-high log p(x) is as atypical as
    noise's too-low one. The statistics are treated as independent, one KDE each; those
    that do not vary over the train rows (ActNorm's, the 1x1 convolution's log|det|) are
    left out. The fit refuses the model's own training images (a leak).

    Paper: Morningstar et al. 2021, "Density of States Estimation for Out-of-Distribution
    Detection" (AISTATS).
    Needs: held-out in-distribution train rows (score --held-out, on a run trained with
    --limit N; --train-limit sets how many, default 2000).
    """
    return dos.kde_log_density(fitted, rows)


DETECTOR = Detector(
    "dose", dose,
    needs=(Columns(), HeldOutTrainRows(purpose="to fit the density of states on")),
    prepare=model_statistics,
    describe_fitted=describer("dose"),
)
