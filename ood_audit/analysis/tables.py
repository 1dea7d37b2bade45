"""How the analyses slice a scores table: which rows are the reference, which the OOD sets.

- **Reference** (the positive class of every metric, the baseline of every gap): the
  in-distribution test split, untransformed: ``role == "in" & split == "test" &
  transform == "none"``.
- **OOD sets**: rows with ``role == "ood"``, one set per (dataset, transform). Its label
  is the data set name, with the transform in brackets when there is one:
  ``mnist``, ``cifar10[grayscale]``. Gates name sets by this label.
- **Groups** (for histograms and the decomposition): every (dataset, role, split,
  transform) present, in-distribution first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..runs import RunDir
from ..scoring.parquet import read_scores
from ..scoring.schema import ScoresMeta
from .detectors.table import with_detector_scores

GROUP_KEYS = ["dataset", "role", "split", "transform"]


def scores_location(rd: RunDir) -> Path:
    """The ``scores/`` folder of part files, else an older run's ``scores.parquet``;
    UserError when neither exists."""
    for path in (rd.scores, rd.legacy_scores):
        if path.exists():
            return path
    raise UserError(
        f"{rd.root} holds no scores.parquet or scores/ folder: run ood-audit score "
        f"{rd.root} --ood mnist first"
    )


def load_run_scores(rd: RunDir) -> tuple[pd.DataFrame, ScoresMeta]:
    """The run's scores table (checked by :func:`~ood_audit.scoring.parquet.read_scores`),
    with the ``score_<name>`` column of every detector ``score`` chose, computed now
    (:func:`~ood_audit.analysis.detectors.table.with_detector_scores`)."""
    return with_detector_scores(*read_scores(scores_location(rd)))


def set_label(dataset: str, transform: str) -> str:
    """``mnist`` or ``cifar10[grayscale]``: how reports and gates name a (dataset, transform)."""
    return dataset if transform in ("none", "", None) else f"{dataset}[{transform}]"


def group_label(dataset: str, role: str, split: str, transform: str) -> str:
    """Label of a histogram / decomposition group: ``fashionmnist test``, ``mnist test``."""
    return f"{set_label(dataset, transform)} {split}"


def reference_mask(df: pd.DataFrame) -> pd.Series:
    return (df["role"] == "in") & (df["split"] == "test") & (df["transform"] == "none")


def reference_rows(df: pd.DataFrame, where: str = "scores") -> pd.DataFrame:
    """The in-distribution test rows; UserError when the table has none."""
    ref = df[reference_mask(df)]
    if ref.empty:
        raise UserError(
            f"{where} hold no in-distribution test rows (role=in, split=test, transform=none); "
            "rescore with ood-audit score"
        )
    return ref


@dataclass(frozen=True)
class OodSet:
    label: str
    dataset: str
    transform: str
    rows: pd.DataFrame


def ood_sets(df: pd.DataFrame) -> list[OodSet]:
    """Every OOD set of the table, in order of first appearance."""
    ood = df[df["role"] == "ood"]
    out = []
    for (dataset, transform), rows in ood.groupby(["dataset", "transform"], sort=False):
        out.append(OodSet(set_label(dataset, transform), dataset, transform, rows))
    return out


def groups(df: pd.DataFrame) -> list[tuple[tuple[str, str, str, str], pd.DataFrame]]:
    """(dataset, role, split, transform) groups: in-distribution first, train before test."""
    found = list(df.groupby(GROUP_KEYS, sort=False))

    def order(item):
        (dataset, role, split, transform), _ = item
        return (role != "in", transform != "none", split != "train")

    return sorted(found, key=order)
