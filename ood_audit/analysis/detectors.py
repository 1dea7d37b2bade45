"""The detector registry: every way of turning a scored row into an OOD score.

Convention (see :mod:`ood_audit.analysis.metrics`): a detector's score is **higher for
inputs that look more in-distribution**. Every entry of :data:`DETECTORS` appears in
every report without touching it:

===================  ===================================================================
``likelihood``       log p(x) (Nalisnick et al. 2019). Needs: the scored model.
``typicality``       -| -log p(x) - H_hat |, H_hat = mean -log p(x) of in-distribution
                     train rows (Nalisnick et al. 2019b). Needs: train rows
                     (``score --train-limit N``, ``--held-out`` for unseen train images).
``likelihood-ratio`` log p_model(x) - log p_background(x) (Ren et al. 2019). Needs: a
                     background model, ``ood-audit train --background --run RUN``.
``complexity``       L(x) - bits_model(x), L = PNG length in bits, bits_model = bpd * D =
                     -log2 P(k) (Serra et al. 2020: the negated S(x)). Needs: nothing more.
``complexity-jp2``   the same with lossless JPEG 2000 as the compressor.
``waic``             mean - variance of log p(x) over an ensemble (Choi et al. 2018).
                     Needs: other runs on the same data, ``score --member RUN``.
``level-ratio``      per-dimension log-likelihood of a multi-scale flow's last level minus
                     that of its earlier levels (after Schirrmeister et al. 2020). Needs:
                     a model with ``log_pz_level{i}`` terms (Glow), L >= 2.
``ensemble``         log of the members' mean density, log (1/M) sum_j p_j(x) (Nalisnick
                     et al. 2019: ensembles do not close the gap). Needs: an ensemble.
===================  ===================================================================

``ood-audit score`` writes each selected detector's inputs and records the selection in
the metadata (all that apply by default); :func:`with_detector_scores`, called by every
reader (:func:`ood_audit.analysis.tables.load_run_scores`), adds the ``score_<name>``
columns at read time, since several need the whole table (typicality's entropy comes
from the train rows). A report shows ``likelihood`` and those columns.
:func:`detector_scores` computes a detector named explicitly from its input columns
when its column is absent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import UserError
from ..scoring.features import FEATURES
from ..scoring.schema import BACKGROUND_COLUMN, ENSEMBLE_COLUMN, MEMBER_PREFIX, ScoresMeta
from . import typicality

SCORE_PREFIX = "score_"
LEVEL_DIMS_KEY = "level_dims"  # ScoresMeta.extra key: JSON list, dims factored out per level
DETECTORS_KEY = "detectors"  # ScoresMeta.extra key: JSON list of the detectors score chose
ENTROPY_KEY = "typicality_entropy_nats"  # ScoresMeta.extra key set at read time


@dataclass(frozen=True)
class Detector:
    """One OOD detector.

    ``needs``: the table columns ``score`` reads. ``check(df, meta)``: what else is
    missing (rows, an ensemble's columns, metadata), in words, or None. ``requires``:
    what it needs beyond the scored model, in a few words (``--help``, the README);
    ``fix``: what a user does when that is missing (the end of the error line).
    A detector whose inputs are missing (and that has no precomputed ``score_<name>``
    column) is skipped when all detectors are requested, and an error when named.
    ``score(df, meta)``: one float per row, higher = more in-distribution.
    """

    name: str
    summary: str
    needs: tuple[str, ...]
    score: Callable[[pd.DataFrame, ScoresMeta], pd.Series]
    requires: str = "nothing more"
    fix: str = "rescore with ood-audit score"
    check: Callable[[pd.DataFrame, ScoresMeta | None], str | None] | None = None

    def missing(self, df: pd.DataFrame, meta: ScoresMeta | None) -> str | None:
        """None when ``df`` (and ``meta``) hold everything ``score`` needs, else one line
        saying what is missing and how to supply it."""
        cols = [c for c in self.needs if c not in df.columns]
        what = f"column(s) {', '.join(cols)}" if cols else None
        if what is None and self.check is not None:
            what = self.check(df, meta)
        if what is None:
            return None
        return f"detector {self.name!r} needs {what}; {self.fix}"


# ----------------------------------------------------------------- formulas

def _likelihood(df: pd.DataFrame, meta: ScoresMeta) -> pd.Series:
    return df["log_px"].astype(float)


def _typicality(df: pd.DataFrame, meta: ScoresMeta) -> pd.Series:
    entropy = typicality.entropy_estimate(typicality.entropy_rows(df))
    return pd.Series(typicality.typicality_score(df["log_px"], entropy), index=df.index)


def _needs_train_rows(df: pd.DataFrame, meta: ScoresMeta | None) -> str | None:
    if len(typicality.entropy_rows(df)) < 2:
        return "in-distribution train rows to estimate the entropy"
    return None


def _likelihood_ratio(df: pd.DataFrame, meta: ScoresMeta) -> pd.Series:
    return df["log_px"].astype(float) - df[BACKGROUND_COLUMN].astype(float)


def complexity_score(bpd: pd.Series, n_dims: pd.Series, compressed_bits: pd.Series) -> pd.Series:
    """-S(x) = L(x) - bits_model(x) with bits_model = bpd * D = -log2 P(k), the model's
    discrete code length (Serra et al. 2020, S(x) = -log2 p(x) - L(x), higher S = OOD)."""
    return compressed_bits.astype(float) - bpd.astype(float) * n_dims.astype(float)


def _complexity(feature: str) -> Callable[[pd.DataFrame, ScoresMeta], pd.Series]:
    def score(df: pd.DataFrame, meta: ScoresMeta) -> pd.Series:
        return complexity_score(df["bpd"], df["n_dims"], df[feature])
    return score


def member_columns(df: pd.DataFrame) -> list[str]:
    """``log_px_member1``, ``log_px_member2``... in member order (member 0 is ``log_px``)."""
    found = [c for c in df.columns if c.startswith(MEMBER_PREFIX)
             and c[len(MEMBER_PREFIX):].isdigit()]
    return sorted(found, key=lambda c: int(c[len(MEMBER_PREFIX):]))


def waic_score(log_px_members: np.ndarray) -> np.ndarray:
    """WAIC(x) = mean_j log p_j(x) - var_j log p_j(x) over the M members (axis 1; sample
    variance, ddof=1), Choi et al. 2018."""
    v = np.asarray(log_px_members, dtype=float)
    return v.mean(axis=1) - v.var(axis=1, ddof=1)


def _waic(df: pd.DataFrame, meta: ScoresMeta) -> pd.Series:
    cols = ["log_px", *member_columns(df)]
    return pd.Series(waic_score(df[cols].to_numpy(float)), index=df.index)


def _needs_members(df: pd.DataFrame, meta: ScoresMeta | None) -> str | None:
    return None if member_columns(df) else "an ensemble of at least two models"


def level_terms(meta: ScoresMeta | None) -> list[list[str]]:
    """The model terms of each level i (``log_pz_level{i}``, ``logdet_level{i}_*``)."""
    terms = meta.terms if meta is not None else []
    levels = sorted({int(t[len("log_pz_level"):]) for t in terms
                     if t.startswith("log_pz_level") and t[len("log_pz_level"):].isdigit()})
    return [[t for t in terms if t == f"log_pz_level{i}" or t.startswith(f"logdet_level{i}_")]
            for i in levels]


def level_dims(meta: ScoresMeta | None) -> list[int] | None:
    if meta is None or LEVEL_DIMS_KEY not in meta.extra:
        return None
    try:
        dims = [int(d) for d in json.loads(meta.extra[LEVEL_DIMS_KEY])]
    except (ValueError, TypeError):
        return None
    return dims if all(d > 0 for d in dims) else None


def level_ratio_score(contributions: np.ndarray, dims) -> np.ndarray:
    """``contributions`` [N, L]: c_i = log p(z_i) + the log|det| of level i's steps (they
    sum to log p(x)); ``dims`` [L]: d_i, the dimensions factored out at level i (they sum
    to D). Score = c_{L-1} / d_{L-1} - sum_{i<L-1} c_i / sum_{i<L-1} d_i, in nats/dim."""
    c = np.asarray(contributions, dtype=float)
    d = np.asarray(dims, dtype=float)
    return c[:, -1] / d[-1] - c[:, :-1].sum(axis=1) / d[:-1].sum()


def _level_ratio(df: pd.DataFrame, meta: ScoresMeta) -> pd.Series:
    groups = level_terms(meta)
    contributions = np.stack([df[g].to_numpy(float).sum(axis=1) for g in groups], axis=1)
    return pd.Series(level_ratio_score(contributions, level_dims(meta)), index=df.index)


def _needs_levels(df: pd.DataFrame, meta: ScoresMeta | None) -> str | None:
    groups = level_terms(meta)
    if len(groups) < 2:
        return "a multi-scale flow with two or more levels (log_pz_level{i} terms)"
    missing = [t for g in groups for t in g if t not in df.columns]
    if missing:
        return f"column(s) {', '.join(missing)}"
    dims = level_dims(meta)
    if dims is None or len(dims) != len(groups):
        return "the latent size of each level (scores metadata level_dims)"
    return None


def _ensemble(df: pd.DataFrame, meta: ScoresMeta) -> pd.Series:
    return df[ENSEMBLE_COLUMN].astype(float)


_BACKGROUND_FIX = ("train one with ood-audit train --background --run RUN, then rescore "
                   "with ood-audit score --run RUN")

DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in [
        Detector(
            name="likelihood",
            summary="log p(x) in nats (Nalisnick et al. 2019): higher = more in-distribution",
            needs=("log_px",),
            score=_likelihood,
        ),
        Detector(
            name="typicality",
            summary="-| -log p(x) - H_hat |, H_hat = mean -log p(x) of in-distribution train "
                    "rows (Nalisnick et al. 2019b)",
            needs=("log_px",),
            score=_typicality,
            requires="in-distribution train rows (--train-limit, default 2000)",
            fix="rescore with --train-limit N (N >= 2; --held-out for unseen train images)",
            check=_needs_train_rows,
        ),
        Detector(
            name="likelihood-ratio",
            summary="log p_model(x) - log p_background(x), background trained on perturbed "
                    "inputs (Ren et al. 2019)",
            needs=("log_px", BACKGROUND_COLUMN),
            score=_likelihood_ratio,
            requires="a background model, RUN/background (train --background)",
            fix=_BACKGROUND_FIX,
        ),
        *[Detector(
            name=feature.detector,
            summary=f"L(x) - bits_model(x), L = {feature.summary}, bits_model = bpd * D "
                    "(Serra et al. 2020, -S(x))",
            needs=("bpd", "n_dims", feature.column),
            score=_complexity(feature.column),
            fix=f"rescore with ood-audit score --detector {feature.detector}",
        ) for feature in FEATURES.values()],
        Detector(
            name="waic",
            summary="mean - variance of log p(x) over an ensemble (Choi et al. 2018)",
            needs=("log_px",),
            score=_waic,
            requires="an ensemble: score --member RUN2 [--member RUN3 ...]",
            fix="rescore with --member RUN2 [--member RUN3 ...]: runs trained on the same "
                "data (this run is member 0)",
            check=_needs_members,
        ),
        Detector(
            name="level-ratio",
            summary="nats/dim of a multi-scale flow's last level minus its earlier levels' "
                    "(after Schirrmeister et al. 2020)",
            needs=("log_px",),
            score=_level_ratio,
            requires="a multi-scale flow (glow, glow-cv)",
            fix="it applies to multi-scale flows (glow, glow-cv) scored by ood-audit score",
            check=_needs_levels,
        ),
        Detector(
            name="ensemble",
            summary="log of the ensemble's mean density, log (1/M) sum_j p_j(x) "
                    "(Nalisnick et al. 2019)",
            needs=("log_px", ENSEMBLE_COLUMN),
            score=_ensemble,
            requires="an ensemble: score --member RUN2 ..., or --run on an ensemble folder",
            fix="rescore with --member RUN2 [--member RUN3 ...], or --run on a folder written "
                "by train --seeds",
        ),
    ]
}

DEFAULT_DETECTOR = "likelihood"


def applicable_detectors(df: pd.DataFrame, meta: ScoresMeta | None = None) -> list[str]:
    """Registered detectors whose inputs ``df`` (and ``meta``) hold: what ``score`` can
    write for this table."""
    return [name for name, det in DETECTORS.items() if det.missing(df, meta) is None]


def available_detectors(df: pd.DataFrame, meta: ScoresMeta | None = None) -> list[str]:
    """Detectors a report shows for this table: ``likelihood`` (log p(x) is always
    there), every registered detector ``score`` wrote a ``score_<name>`` column for, then
    any ``score_<name>`` column of a detector this version does not know. Detectors that
    were not scored are not recomputed behind the user's back: rescore to add them."""
    names = [
        name for name, det in DETECTORS.items()
        if f"{SCORE_PREFIX}{name}" in df.columns
        or (name == DEFAULT_DETECTOR and det.missing(df, meta) is None)
    ]
    extra = [c[len(SCORE_PREFIX):] for c in df.columns
             if c.startswith(SCORE_PREFIX) and c[len(SCORE_PREFIX):] not in DETECTORS]
    return names + extra


def compute_detector(name: str, df: pd.DataFrame, meta: ScoresMeta | None) -> pd.Series:
    """Detector ``name`` computed from its inputs (never a ``score_`` column); UserError
    when it is unknown or its inputs are missing."""
    det = DETECTORS.get(name)
    if det is None:
        raise UserError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    why = det.missing(df, meta)
    if why is not None:
        raise UserError(why)
    return det.score(df, meta).astype(float)


def detector_scores(df: pd.DataFrame, meta: ScoresMeta,
                    names: list[str] | None = None) -> dict[str, pd.Series]:
    """Scores per detector, one float per row of ``df`` (same index), higher = more in.

    ``names=None`` means every detector :func:`available_detectors` finds. A named
    detector that is unknown, or whose inputs are missing, raises UserError.
    """
    if names is None:
        names = available_detectors(df, meta)
    out: dict[str, pd.Series] = {}
    for name in names:
        column = f"{SCORE_PREFIX}{name}"
        if column in df.columns:
            out[name] = df[column].astype(float)
            continue
        if name not in DETECTORS:
            raise UserError(f"unknown detector {name!r}; choose from "
                            f"{', '.join(available_detectors(df, meta))}")
        out[name] = compute_detector(name, df, meta)
    return out


def with_detector_scores(df: pd.DataFrame, meta: ScoresMeta) -> tuple[pd.DataFrame, ScoresMeta]:
    """Add a ``score_<name>`` column for every detector ``score`` chose (metadata
    ``detectors``) that the table does not hold yet; the meta gains read-time values
    (``typicality_entropy_nats``). Tables without that list (precomputed columns, older
    runs) come back unchanged. ``likelihood`` needs no column: it is ``log_px``.
    """
    try:
        names = json.loads(meta.extra.get(DETECTORS_KEY, "[]"))
    except ValueError:
        raise UserError(f"scores metadata {DETECTORS_KEY!r} is damaged; rescore") from None
    new = {}
    for name in names:
        column = f"{SCORE_PREFIX}{name}"
        if name == DEFAULT_DETECTOR or column in df.columns or name not in DETECTORS:
            continue
        new[column] = compute_detector(name, df, meta).to_numpy(float)
    if not new:
        return df, meta
    extra = dict(meta.extra)
    if f"{SCORE_PREFIX}typicality" in new:
        extra[ENTROPY_KEY] = f"{typicality.entropy_estimate(typicality.entropy_rows(df)):.6g}"
    df = pd.concat([df, pd.DataFrame(new, index=df.index)], axis=1)
    return df, dataclasses.replace(meta, extra=extra)


def detectors_help() -> str:
    """One line per detector with what it needs, for ``--help``."""
    return "; ".join(f"{d.name}: {d.summary}" for d in DETECTORS.values())
