"""``ood-audit score`` as one library call: per-image likelihood terms of the
in-distribution test split and each OOD set, and the inputs of the detectors.

:func:`score` takes the run's lock (only rank 0 under torchrun: the ranks write one table
together), chooses the detectors (:mod:`ood_audit.analysis.detectors`), has their needs
supplied (:mod:`ood_audit.scoring.companions`), scores
(:func:`ood_audit.scoring.scorer.write_scores`) and turns Ctrl-C into a clean stop that
says what was kept. The scoring layer never names a detector; this module does.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..analysis.detectors import DETECTORS
from ..analysis.detectors.table import check_known, detector_scores, planned
from ..analysis.metrics import ood_metrics
from ..analysis.tables import load_run_scores, ood_sets, reference_rows, set_label
from ..checkpoint import CheckpointInfo
from ..config import ScoreConfig
from ..distributed import dist_env, init_distributed
from ..errors import Interrupted
from ..models.base import DensityModel
from ..runs import RunDir, resolve_run, run_lock
from ..scoring.batches import model_columns
from ..scoring.companions import InputPlan, prepare_inputs
from ..scoring.jobs import ScoreJob
from ..scoring.schema import LEVEL_DIMS_KEY, ScoresMeta, totals_for
from ..scoring.scorer import ScoreProgress, write_scores
from ..scoring.writer import SetSummary, folder_identity


@dataclass
class ScoreResult:
    """What ``score`` did: the table's folder and, per scored set, its means.

    ``is_main`` is False on torchrun ranks other than 0, which return no summaries.
    """

    run: RunDir
    sets: list[SetSummary] = field(default_factory=list)
    is_main: bool = True

    @property
    def rows(self) -> int:
        return sum(s.n for s in self.sets)

    def detector_aurocs(self) -> dict[str, dict[str, float]]:
        """AUROC of every detector the scores hold, per OOD set label (in-distribution
        test positive; no bootstrap): reads the table back."""
        df, meta = load_run_scores(self.run)
        ref, sets = reference_rows(df), ood_sets(df)
        out: dict[str, dict[str, float]] = {}
        for name, s in detector_scores(df, meta).items():
            a = s.loc[ref.index].to_numpy(float)
            out[name] = {}
            for oset in sets:
                b = s.loc[oset.rows.index].to_numpy(float)
                a_ok, b_ok = a[~np.isnan(a)], b[~np.isnan(b)]
                out[name][oset.label] = (ood_metrics(a_ok, b_ok, n_boot=0)["auroc"]
                                         if a_ok.size and b_ok.size else math.nan)
        return out

    def likelihood_auroc(self, s: SetSummary) -> float | None:
        """AUROC of log p(x) for an OOD set's summary (None for in-distribution sets),
        from the summaries alone."""
        if s.role != "ood":
            return None
        ref = next(x for x in self.sets if x.role == "in" and x.split == "test")
        a, b = ref.log_px[~np.isnan(ref.log_px)], s.log_px[~np.isnan(s.log_px)]
        return ood_metrics(a, b, n_boot=0)["auroc"] if a.size and b.size else math.nan


def score(run: Path | RunDir | None, cfg: ScoreConfig, *, data_root: Path | None = None,
          download: bool = False, notify=print,
          progress: ScoreProgress | None = None,
          loaded: tuple[DensityModel, CheckpointInfo] | None = None) -> ScoreResult:
    """Score ``cfg.ood`` (and the in-distribution splits) with the run's checkpoint into
    ``RUN/scores``; ``run`` None is the last run trained.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this; the sets are split across
    them and rank 0 alone holds the lock and returns the summaries. Ctrl-C raises
    :class:`~ood_audit.errors.Interrupted` saying what ``RUN/scores`` holds: the folder
    is swapped in whole, so the old table or the complete new one, never a part.
    ``loaded``: a model in memory and its info, scored instead of the run's checkpoint
    (``ood_audit.audit`` on a module; see :func:`~ood_audit.scoring.scorer.write_scores`).
    """
    rd = run if isinstance(run, RunDir) else resolve_run(run)
    ctx = init_distributed(cfg.device) if dist_env()[1] > 1 else None
    is_main = ctx is None or ctx.is_main
    before = folder_identity(rd.scores)
    try:
        with run_lock(rd, "ood-audit score") if is_main else contextlib.nullcontext():
            sets = write_scores(rd, cfg, root=data_root, download=download, notify=notify,
                                progress=progress if is_main else None,
                                inputs_for=lambda *got: detector_inputs(rd, cfg, *got),
                                loaded=loaded)
    except KeyboardInterrupt:
        kept = ("was left as it was" if folder_identity(rd.scores) == before
                else "holds the complete new table (the summary was not printed)")
        raise Interrupted(f"scoring stopped; {rd.scores} {kept}: a partial table is never "
                          "published") from None
    finally:
        if ctx is not None:
            ctx.close()
    return ScoreResult(rd, sets, is_main)


def score_run(rd: RunDir, ood: list[str], *, root: Path | None = None, download: bool = False,
              notify=print, progress: ScoreProgress | None = None,
              **options) -> list[SetSummary]:
    """:func:`score` with the config as keywords (the fields of
    :class:`~ood_audit.config.ScoreConfig`), returning the per-set summaries."""
    cfg = ScoreConfig(ood=list(ood), **options)
    return score(rd, cfg, data_root=root, download=download, notify=notify,
                 progress=progress).sets


def detector_inputs(rd: RunDir, cfg: ScoreConfig, model: DensityModel, info: CheckpointInfo,
                    jobs: list[ScoreJob], device: torch.device) -> InputPlan:
    """Choose the detectors and load what they need; UserError, before any scoring, for
    an unknown detector or a named one whose needs cannot be met.

    ``cfg.detectors`` None: every registered detector whose needs are met. Ensemble
    members: an ensemble folder's, then ``cfg.members`` (member 0 is the run).
    """
    if cfg.detectors is not None:
        check_known(cfg.detectors)
    wanted = [n for n in DETECTORS if cfg.detectors is None or n in cfg.detectors]
    terms, extras = model_columns(model, device)
    plan = prepare_inputs([need for n in wanted for need in DETECTORS[n].needs], rd, model, info,
                          members=[*rd.ensemble_members()[1:], *map(Path, cfg.members)],
                          terms=terms, device=device, held_out=cfg.held_out)
    # The metadata the finished table will carry, as far as the detectors read it.
    future = ScoresMeta(
        version="", schema_version="", model=info.model, in_dataset=info.dataset,
        terms=terms, run_config=info.run_config, checkpoint_sha256=info.sha256,
        dequant_seed=cfg.seed, extra={} if plan.level_dims is None else {
            LEVEL_DIMS_KEY: json.dumps(plan.level_dims)},
        extra_columns=[*extras, *plan.columns])
    columns = [*terms, *totals_for(terms), *extras, *plan.columns]
    sets = [(j.images.name, j.role, j.images.split, j.transform) for j in jobs]
    plan.detectors = planned(cfg.detectors, columns, sets, future)
    return plan


def set_name(s: SetSummary) -> str:
    """How reports and gates name a scored set: ``mnist``, ``cifar10[grayscale]``."""
    return set_label(s.dataset, s.transform)
