"""The detector registry: every way of turning a scored row into an OOD score.

Convention (see :mod:`ood_audit.analysis.metrics`): a detector's score is **higher for
inputs that look more in-distribution**. Today the only entry is ``likelihood``
(log p(x), the paper's detector); later detectors (likelihood ratio, typicality, input
complexity, WAIC) are added here and appear in every report without touching it.

A scorer may precompute a detector into a ``score_<name>`` column (when it needs the
model, e.g. a background model's log-likelihood); :func:`detector_scores` uses that
column when present, else calls the detector's ``score`` on the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from ..errors import UserError
from ..scoring.schema import ScoresMeta

SCORE_PREFIX = "score_"


@dataclass(frozen=True)
class Detector:
    """One OOD detector.

    ``needs``: the table columns ``score`` reads; a detector whose columns are missing
    (and that has no precomputed ``score_<name>`` column) is skipped when all detectors
    are requested, and an error when named explicitly.
    ``score(df, meta)``: one float per row, higher = more in-distribution.
    """

    name: str
    summary: str
    needs: tuple[str, ...]
    score: Callable[[pd.DataFrame, ScoresMeta], pd.Series]


def _likelihood(df: pd.DataFrame, meta: ScoresMeta) -> pd.Series:
    return df["log_px"].astype(float)


DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in [
        Detector(
            name="likelihood",
            summary="log p(x) in nats (Nalisnick et al. 2019): higher = more in-distribution",
            needs=("log_px",),
            score=_likelihood,
        ),
    ]
}

DEFAULT_DETECTOR = "likelihood"


def available_detectors(df: pd.DataFrame) -> list[str]:
    """Detectors this table can score: registered ones whose inputs are present, then any
    ``score_<name>`` column a scorer wrote for a detector this version does not know."""
    names = [
        name for name, det in DETECTORS.items()
        if f"{SCORE_PREFIX}{name}" in df.columns or all(c in df.columns for c in det.needs)
    ]
    extra = [c[len(SCORE_PREFIX):] for c in df.columns
             if c.startswith(SCORE_PREFIX) and c[len(SCORE_PREFIX):] not in DETECTORS]
    return names + extra


def detector_scores(df: pd.DataFrame, meta: ScoresMeta,
                    names: list[str] | None = None) -> dict[str, pd.Series]:
    """Scores per detector, one float per row of ``df`` (same index), higher = more in.

    ``names=None`` means every detector :func:`available_detectors` finds. A named
    detector that is unknown, or whose input columns are missing, raises UserError.
    """
    if names is None:
        names = available_detectors(df)
    out: dict[str, pd.Series] = {}
    for name in names:
        column = f"{SCORE_PREFIX}{name}"
        if column in df.columns:
            out[name] = df[column].astype(float)
            continue
        det = DETECTORS.get(name)
        if det is None:
            raise UserError(
                f"unknown detector {name!r}; choose from {', '.join(available_detectors(df))}"
            )
        missing = [c for c in det.needs if c not in df.columns]
        if missing:
            raise UserError(
                f"detector {name!r} needs column(s) {', '.join(missing)}, which the scores "
                "lack; rescore with ood-audit score"
            )
        out[name] = det.score(df, meta).astype(float)
    return out
