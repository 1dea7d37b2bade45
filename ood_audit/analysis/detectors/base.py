"""The detector contract: one file per detector, a pure score function, its needs.

A detector module defines ``DETECTOR = Detector(...)`` around a pure function
``score(rows, fitted) -> [N] float``: ``rows`` maps column names to float64 arrays, one
value per scored image (the model's terms, ``log_px``, ``bpd``, and the columns its
needs bring); higher means more in-distribution. A detector that learns from
in-distribution data gives a ``prepare(train, meta) -> fitted`` hook, called once per
table on the in-distribution train rows (``score --train-limit``; ``--held-out`` for
train images the model never saw) and on the metadata: typicality's entropy estimate,
level-ratio's level sizes, a density of states fitted on held-out statistics.

The score function's docstring is the detector's one description: its first paragraph
(the formula) is the summary in ``--help``, the report's legend and docs/detectors.md;
a ``Paper:`` line cites where it comes from; a ``Needs:`` line says what it takes in
words. ``needs`` says the same to the machine (:mod:`ood_audit.scoring.needs`).
``published`` holds AUROCs a paper reports for this detector, shown beside ours.

Torch- and pandas-free, so the registry (and ``--help``) loads fast; the table side is
:mod:`.table`. A new detector is a module here plus a line in the registry
(``__init__.py``); what it takes decides what else it touches:

- columns every table has, or a model's own extra columns (a hierarchical VAE's
  likelihoods with the top k latents from the prior): ``needs=(Columns((...)),)``;
- a state fitted on in-distribution data (a density of states over per-image statistics):
  ``TrainRows()`` and ``prepare``, which sees the metadata, so it can refuse rows the
  model was trained on (``train_rows`` says whether they were held out);
- work per image while scoring (likelihood regret's re-fit of the encoder): a new
  :class:`~ood_audit.scoring.needs.Need` and its provider in
  :data:`ood_audit.scoring.companions.PROVIDERS`, which adds a ``Computation`` to the
  batch loop.

Example, a whole detector::

    def likelihood_ratio(rows: Rows, fitted: None = None) -> np.ndarray:
        \"\"\"log p_model(x) - log p_background(x), ...

        Paper: Ren et al. 2019, "Likelihood Ratios for Out-of-Distribution Detection".
        Needs: a background model in RUN/background (train --background).
        \"\"\"
        return rows["log_px"] - rows[BACKGROUND_COLUMN]

    DETECTOR = Detector("likelihood-ratio", likelihood_ratio,
                        needs=(Columns(), BackgroundModel()),
                        published=(Published("fashionmnist", "mnist", AUROC, "pixelcnn",
                                             "Ren et al. 2019, table N"),))
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ...scoring.needs import Columns, Need

Rows = Mapping[str, np.ndarray]  # column name -> float64 [N]


@dataclass(frozen=True)
class Published:
    """An AUROC a paper reports for a detector on one pairing (in-distribution -> OOD)."""

    in_dataset: str  # registry name, e.g. "fashionmnist"
    ood: str  # e.g. "mnist"
    auroc: float
    model: str  # the model family the paper used, e.g. "glow", "pixelcnn", "hvae"
    citation: str  # author year, table, e.g. "Ren et al. 2019, table 2"


@dataclass(frozen=True)
class Detector:
    """One OOD detector. ``score`` and ``prepare`` are pure (no I/O, no globals)."""

    name: str
    score: Callable[[Rows, object], np.ndarray]
    needs: tuple[Need, ...] = (Columns(),)
    prepare: Callable[[Rows, object], object] | None = None
    #: metadata entries describing the fitted state (ScoresMeta.extra), e.g. the entropy
    describe_fitted: Callable[[object], dict[str, str]] | None = None
    published: tuple[Published, ...] = ()
    doc: str = field(default="", init=False)

    def __post_init__(self) -> None:
        doc = inspect.getdoc(self.score) or ""
        if not doc:
            raise ValueError(f"detector {self.name!r}: its score function needs a docstring")
        object.__setattr__(self, "doc", doc)

    @property
    def summary(self) -> str:
        """The docstring's first paragraph on one line: the formula."""
        return " ".join(self.doc.split("\n\n", 1)[0].split())

    def _line(self, key: str) -> str:
        match = re.search(rf"^{key}:\s*(.+?)(?:\n\n|\n[A-Z][a-z]+:|\Z)", self.doc, re.S | re.M)
        return " ".join(match.group(1).split()) if match else ""

    @property
    def paper(self) -> str:
        """The ``Paper:`` line of the docstring."""
        return self._line("Paper")

    @property
    def requires(self) -> str:
        """The ``Needs:`` line of the docstring: what it takes beyond the scored model."""
        return self._line("Needs") or "nothing more"

    def missing(self, df, meta) -> str | None:
        """None when the table (and its metadata) hold everything ``score`` needs, else
        one line saying what is missing and how to supply it."""
        for need in self.needs:
            what = need.missing(df, meta)
            if what is not None:
                return f"detector {self.name!r} needs {what}; {need.fix(self.name)}"
        return None
