"""What a detector can need beyond the scored model's own terms, and how it is missed.

A detector (:mod:`ood_audit.analysis.detectors`) declares its inputs as a tuple of these
*needs*, its one hook. The same objects serve both sides of the table:

- before scoring, ``score`` collects the needs of the detectors it will write and lets
  :mod:`.companions` supply each one that costs work (a background model scored on the
  same x, a data feature per image); a need it cannot meet fails at once, in one line;
- when a table is read, :meth:`Need.missing` says, in words, what the table lacks, and
  :meth:`Need.fix` what the user does about it.

A new kind of input (a per-image optimisation, a fitted state, another model's terms)
is a new :class:`Need` here plus, when the scorer must compute it, a provider in
:data:`ood_audit.scoring.companions.PROVIDERS`. Torch- and pandas-free: the registry of
detectors, and ``--help``, import it. ``missing`` takes the table duck-typed (anything
with ``columns`` and pandas-style boolean indexing).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from .schema import (
    BACKGROUND_COLUMN,
    ENSEMBLE_COLUMN,
    LEVEL_DIMS_KEY,
    MEMBER_PREFIX,
    REGRET_COLUMN,
    SKIP_PREFIX,
    TRAIN_ROWS_HELD_OUT_KEY,
    ScoresMeta,
)

_BACKGROUND_FIX = ("train one with ood-audit train --background --run RUN, then rescore "
                   "with ood-audit score RUN")


def _absent(df, names: Iterable[str]) -> str | None:
    cols = [c for c in names if c not in df.columns]
    return f"column(s) {', '.join(cols)}" if cols else None


def member_columns(columns: Iterable[str]) -> list[str]:
    """``log_px_member1``, ``log_px_member2``... in member order (member 0 is ``log_px``)."""
    found = [c for c in columns if c.startswith(MEMBER_PREFIX) and c[len(MEMBER_PREFIX):].isdigit()]
    return sorted(found, key=lambda c: int(c[len(MEMBER_PREFIX):]))


def skip_columns(columns: Iterable[str]) -> list[str]:
    """``log_px_skip1``, ``log_px_skip2``... (a hierarchical VAE's L^>k bounds), by k."""
    found = [c for c in columns if c.startswith(SKIP_PREFIX) and c[len(SKIP_PREFIX):].isdigit()]
    return sorted(found, key=lambda c: int(c[len(SKIP_PREFIX):]))


def train_rows_mask(df):
    """The in-distribution train rows, untransformed: what a detector fits on."""
    return (df["role"] == "in") & (df["split"] == "train") & (df["transform"] == "none")


def level_terms(meta: ScoresMeta | None) -> list[list[str]]:
    """The model terms of each level i (``log_pz_level{i}``, ``logdet_level{i}_*``)."""
    terms = meta.terms if meta is not None else []
    levels = sorted({int(t[len("log_pz_level"):]) for t in terms
                     if t.startswith("log_pz_level") and t[len("log_pz_level"):].isdigit()})
    return [[t for t in terms if t == f"log_pz_level{i}" or t.startswith(f"logdet_level{i}_")]
            for i in levels]


def level_dims(meta: ScoresMeta | None) -> list[int] | None:
    """The dimensions each level factors out (metadata ``level_dims``), or None."""
    if meta is None or LEVEL_DIMS_KEY not in meta.extra:
        return None
    try:
        dims = [int(d) for d in json.loads(meta.extra[LEVEL_DIMS_KEY])]
    except (ValueError, TypeError):
        return None
    return dims if all(d > 0 for d in dims) else None


@dataclass(frozen=True)
class Need:
    """Something a detector's score needs. Subclasses say what is missing and the fix."""

    #: what it needs beyond the scored model, in a few words (``--help``, docs/detectors.md)
    requires = "nothing more"
    #: True when supplying it costs so much work per image that ``score`` does it only for
    #: a detector named with ``--detector`` (never for the default "every detector")
    on_request = False

    def missing(self, df, meta: ScoresMeta | None) -> str | None:
        """None when the table (and its metadata) hold this, else what is missing, in words."""
        return None

    def fix(self, detector: str) -> str:
        """What a user does when it is missing: the end of the one-line error."""
        return "rescore with ood-audit score"


@dataclass(frozen=True)
class Columns(Need):
    """Columns every scored table has (``log_px``, ``bpd``, ``n_dims``...)."""

    names: tuple[str, ...] = ("log_px",)

    def missing(self, df, meta):
        return _absent(df, self.names)


@dataclass(frozen=True)
class BackgroundModel(Need):
    """log p(x) under the run's background model ``RUN/background``, on the same x."""

    requires = "a background model, RUN/background (train --background)"
    column = BACKGROUND_COLUMN

    def missing(self, df, meta):
        return _absent(df, [self.column])

    def fix(self, detector):
        return _BACKGROUND_FIX


@dataclass(frozen=True)
class Ensemble(Need):
    """Other models trained on the same data (``score --member RUN``, or an ensemble
    folder); ``mean``: also the ensemble's log mean density column."""

    mean: bool = False

    @property
    def requires(self) -> str:  # type: ignore[override]
        if self.mean:
            return "an ensemble: score --member RUN2 ..., or score an ensemble folder"
        return "an ensemble: score --member RUN2 [--member RUN3 ...]"

    def missing(self, df, meta):
        if self.mean:
            return _absent(df, [ENSEMBLE_COLUMN])
        return None if member_columns(df.columns) else "an ensemble of at least two models"

    def fix(self, detector):
        if self.mean:
            return ("rescore with --member RUN2 [--member RUN3 ...], or score a folder "
                    "written by train --seeds")
        return ("rescore with --member RUN2 [--member RUN3 ...]: runs trained on the same "
                "data (this run is member 0)")


@dataclass(frozen=True)
class DataFeature(Need):
    """A number per image from its raw pixels, no model (:mod:`.features`: ``png_bits``)."""

    column: str = "png_bits"

    def missing(self, df, meta):
        return _absent(df, [self.column])

    def fix(self, detector):
        return f"rescore with ood-audit score --detector {detector}"


@dataclass(frozen=True)
class TrainRows(Need):
    """In-distribution train rows (at least ``minimum``), which the detector fits on:
    what its ``prepare`` hook reads."""

    minimum: int = 2
    purpose: str = "to fit on"

    requires = "in-distribution train rows (--train-limit, default 2000)"

    def missing(self, df, meta):
        rows = df.loc[train_rows_mask(df), "log_px"]
        finite = rows[(rows == rows) & (rows.abs() != float("inf"))]  # no NaN, no inf
        if len(finite) < self.minimum:
            return f"in-distribution train rows {self.purpose}"
        return None

    def fix(self, detector):
        return (f"rescore with --train-limit N (N >= {self.minimum}; --held-out for unseen "
                "train images)")


def train_rows_held_out(meta: ScoresMeta | None) -> bool:
    """Whether the table's in-distribution train rows are images the model never saw
    (``score --held-out``; metadata ``train_rows_held_out``)."""
    return meta is not None and meta.extra.get(TRAIN_ROWS_HELD_OUT_KEY) == "true"


@dataclass(frozen=True)
class HeldOutTrainRows(TrainRows):
    """In-distribution train rows the model never saw (``score --held-out``), which the
    detector fits on. Rows the model was trained on are refused: a state fitted on them
    learns the statistics of memorised images, not of unseen in-distribution ones (a leak)."""

    requires = ("held-out in-distribution train rows (score --held-out, on a run trained "
                "with --limit N)")

    def missing(self, df, meta):
        if not train_rows_held_out(meta):
            return ("in-distribution train rows the model never saw (its own training images "
                    "would leak into the fit)")
        return super().missing(df, meta)

    def fix(self, detector):
        return ("rescore with --held-out (train images after the run's --limit N; "
                f"--train-limit N >= {self.minimum})")


@dataclass(frozen=True)
class LevelTerms(Need):
    """The per-level terms of a multi-scale flow and the size of each level's latent."""

    minimum: int = 2

    requires = "a multi-scale flow (glow, glow-cv)"

    def missing(self, df, meta):
        groups = level_terms(meta)
        if len(groups) < self.minimum:
            return "a multi-scale flow with two or more levels (log_pz_level{i} terms)"
        absent = _absent(df, [t for g in groups for t in g])
        if absent:
            return absent
        dims = level_dims(meta)
        if dims is None or len(dims) != len(groups):
            return "the latent size of each level (scores metadata level_dims)"
        return None

    def fix(self, detector):
        return "it applies to multi-scale flows (glow, glow-cv) scored by ood-audit score"


@dataclass(frozen=True)
class SkipBounds(Need):
    """A hierarchical VAE's L^>k bounds (``log_px_skip{k}``, k >= 1), which its
    ``score_columns`` writes as extra columns."""

    requires = "a hierarchical VAE run (--model hvae)"

    def missing(self, df, meta):
        return None if skip_columns(df.columns) else "the L>k bounds of a hierarchical VAE " \
            "(log_px_skip{k} columns)"

    def fix(self, detector):
        return "train with --model hvae and score that run"


@dataclass(frozen=True)
class EncoderRefit(Need):
    """A VAE's encoder re-fit to each image while scoring (likelihood regret): the bound's
    gain, ``likelihood_regret``. ``steps`` Adam steps at ``lr`` with L2 ``weight_decay`` on
    a copy of the encoder per image, the bounds before and after from ``iw_samples``
    common draws."""

    steps: int = 100
    lr: float = 2e-4
    weight_decay: float = 5e-5
    iw_samples: int = 16

    requires = "a VAE run (--model vae); an optimisation per image, so only when named"
    on_request = True

    def missing(self, df, meta):
        if REGRET_COLUMN in df.columns:
            return None
        return f"a VAE's likelihood regret (column {REGRET_COLUMN})"

    def fix(self, detector):
        return (f"rescore a VAE run naming it: ood-audit score RUN --detector {detector} "
                "(slow: an optimisation per image; --limit N keeps it short)")
