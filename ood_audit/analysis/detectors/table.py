"""The detectors on a scores table: which apply, their scores, their columns at read time.

Detectors are pure functions of named columns (:mod:`.base`); this module hands them a
table's columns, fits their ``prepare`` hook on the in-distribution train rows, and
turns what they return into ``score_<name>`` columns. Called by every reader
(:func:`ood_audit.analysis.tables.load_run_scores`), by ``score`` before any scoring
(:func:`planned`) and by the report.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd

from ...errors import UserError
from ...scoring.needs import train_rows_mask
from ...scoring.schema import DETECTORS_KEY, FIXED_COLUMNS, SCORE_PREFIX, SET_COLUMNS, ScoresMeta
from . import DEFAULT_DETECTOR, DETECTORS


class TableRows(Mapping):
    """A table's columns as float64 arrays, each read once: what a score function sees."""

    def __init__(self, df: pd.DataFrame):
        self.df = df
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, column: str) -> np.ndarray:
        if column not in self._cache:
            self._cache[column] = self.df[column].to_numpy(float)
        return self._cache[column]

    def __iter__(self) -> Iterator[str]:
        return iter(self.df.columns)

    def __len__(self) -> int:
        return len(self.df.columns)


def check_known(names: list[str], choices=None) -> None:
    """UserError naming the choices for the first name that is not a detector."""
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise UserError(f"unknown detector {unknown[0]!r}; choose from "
                        f"{', '.join(choices if choices is not None else DETECTORS)}")


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


def _fitted(name: str, df: pd.DataFrame, meta: ScoresMeta | None) -> object:
    det = DETECTORS[name]
    if det.prepare is None:
        return None
    return det.prepare(TableRows(df[train_rows_mask(df)]), meta)


def compute_detector(name: str, df: pd.DataFrame, meta: ScoresMeta | None) -> pd.Series:
    """Detector ``name`` computed from its inputs (never a ``score_`` column); UserError
    when it is unknown or its inputs are missing."""
    check_known([name])
    det = DETECTORS[name]
    why = det.missing(df, meta)
    if why is not None:
        raise UserError(why)
    values = det.score(TableRows(df), _fitted(name, df, meta))
    return pd.Series(np.asarray(values, dtype=float), index=df.index)


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
        check_known([name], available_detectors(df, meta))
        out[name] = compute_detector(name, df, meta)
    return out


def with_detector_scores(df: pd.DataFrame, meta: ScoresMeta) -> tuple[pd.DataFrame, ScoresMeta]:
    """Add a ``score_<name>`` column for every detector ``score`` chose (metadata
    ``detectors``) that the table does not hold yet; the meta gains what the detectors
    fitted (``typicality_entropy_nats``). Tables without that list (precomputed columns,
    older runs) come back unchanged. ``likelihood`` needs no column: it is ``log_px``.
    """
    try:
        names = json.loads(meta.extra.get(DETECTORS_KEY, "[]"))
    except ValueError:
        raise UserError(f"scores metadata {DETECTORS_KEY!r} is damaged; rescore") from None
    new, extra = {}, dict(meta.extra)
    rows = TableRows(df)
    for name in names:
        column = f"{SCORE_PREFIX}{name}"
        if name == DEFAULT_DETECTOR or column in df.columns or name not in DETECTORS:
            continue
        det = DETECTORS[name]
        why = det.missing(df, meta)
        if why is not None:
            raise UserError(why)
        fitted = _fitted(name, df, meta)
        new[column] = np.asarray(det.score(rows, fitted), dtype=float)
        if det.describe_fitted is not None:
            extra.update(det.describe_fitted(fitted))
    if not new:
        return df, meta
    df = pd.concat([df, pd.DataFrame(new, index=df.index)], axis=1)
    return df, dataclasses.replace(meta, extra=extra)


def planned(names: list[str] | None, columns: list[str], sets: list[tuple[str, str, str, str]],
            meta: ScoresMeta) -> list[str]:
    """The detectors ``score`` will write, checked before anything is scored against a
    stand-in of the table it will write (``columns``; two rows per set of ``sets``, as
    (dataset, role, split, transform); ``meta`` as far as known).

    ``names=None``: every detector whose needs are met (the others are skipped); named
    ones that are unknown, or whose needs are not met, are a UserError.
    """
    if names is not None:
        check_known(names)
    rows = [dict(zip(SET_COLUMNS, s, strict=True)) for s in sets for _ in range(2)]
    table = pd.DataFrame(rows, columns=SET_COLUMNS)
    for c in dict.fromkeys([*FIXED_COLUMNS, *columns]):
        if c not in table.columns:
            table[c] = 0.0
    wanted = set(DETECTORS) if names is None else set(names)
    chosen = []
    for name, det in DETECTORS.items():
        if name not in wanted:
            continue
        why = det.missing(table, meta)
        if why is None:
            chosen.append(name)
        elif names is not None:
            raise UserError(why)
    return chosen
