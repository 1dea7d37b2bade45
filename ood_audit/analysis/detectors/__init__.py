"""The detectors: every way of turning a scored row into an OOD score, one file each.

Convention (see :mod:`ood_audit.analysis.metrics`): a detector's score is **higher for
inputs that look more in-distribution**. Every entry of :data:`DETECTORS` appears in
``score --detector``'s choices and help, in docs/detectors.md and in every report's
legend, all read off its score function's docstring (:mod:`.base` says how to write
one). The registry imports neither torch nor pandas; :mod:`.table` computes the scores
of a table.

``ood-audit score`` writes each selected detector's inputs (its ``needs``) and records
the selection in the metadata (all that apply by default); every reader
(:func:`ood_audit.analysis.tables.load_run_scores`) adds the ``score_<name>`` columns at
read time (:func:`.table.with_detector_scores`), since several need the whole table
(typicality's entropy comes from the train rows).
"""

from __future__ import annotations

from ...scoring.needs import level_dims, level_terms, member_columns
from ...scoring.schema import LEVEL_DIMS_KEY, SCORE_PREFIX
from . import (
    complexity,
    complexity_jp2,
    dose,
    dose_complexity,
    dose_minp,
    dose_svm,
    ensemble,
    level_ratio,
    likelihood,
    likelihood_ratio,
    likelihood_regret,
    llr_k,
    typicality,
    waic,
)
from .base import Detector, Published, Rows
from .complexity import complexity_score
from .level_ratio import level_ratio_score
from .waic import waic_score

#: The registry, in the order reports and --help list them.
DETECTORS: dict[str, Detector] = {
    m.DETECTOR.name: m.DETECTOR
    for m in (likelihood, typicality, likelihood_ratio, complexity, complexity_jp2, waic,
              level_ratio, ensemble,
              llr_k, likelihood_regret)
}
# Density of states (Morningstar et al. 2021), fitted on held-out in-distribution rows.
DETECTORS.update({m.DETECTOR.name: m.DETECTOR for m in (dose, dose_svm, dose_complexity,
                                                           dose_minp)})

#: The detector every table has (log p(x)); it needs no score column.
DEFAULT_DETECTOR = "likelihood"


def detectors_help() -> str:
    """One clause per detector with what it needs, for ``--help``."""
    return "; ".join(f"{d.name} (needs {d.requires})" for d in DETECTORS.values())


__all__ = ["DEFAULT_DETECTOR", "DETECTORS", "LEVEL_DIMS_KEY", "SCORE_PREFIX", "Detector",
           "Published", "Rows", "complexity_score", "detectors_help", "level_dims",
           "level_ratio_score", "level_terms", "member_columns", "waic_score"]
