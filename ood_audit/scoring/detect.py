"""What ``ood-audit score`` writes for the detectors beyond the model's own terms.

:func:`plan` decides, *before* any scoring, which detectors apply and loads what they
need, so a named detector whose inputs cannot be had (no background model, no ensemble,
no levels) fails at once with one line. The scorer then adds, inside its batch loop and
on exactly the x the run's model saw (the noise is seeded by set and chunk, not model),
the per-image inputs (:func:`batch_columns`):

- ``log_px_background``: log p(x) under the run's background model ``RUN/background``
  (likelihood ratio, Ren et al. 2019);
- ``log_px_member{i}``, i >= 1, and its group totals ``log_pz_member{i}``,
  ``logdet_member{i}``: each other ensemble member (``--member`` runs, or the members of
  an ensemble folder; member 0 is the run itself), and ``log_px_ensemble``, the log of
  the members' mean density (WAIC, the ensemble detector);
- data features such as ``png_bits`` (input complexity, Serra et al. 2020).

Detector scores (``score_<name>``) are not written: several need the whole table
(typicality's entropy estimate comes from the train rows), so every reader computes them
at read time with :func:`ood_audit.analysis.detectors.with_detector_scores`. The metadata
records, before scoring, which detectors were chosen and where their inputs came from
(:func:`plan_metadata`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..analysis.detectors import DETECTORS, DETECTORS_KEY, LEVEL_DIMS_KEY
from ..checkpoint import CheckpointInfo, load_checkpoint
from ..errors import UserError
from ..models.base import DensityModel, sum_terms
from ..runs import RunDir, resolve_run
from ..training.background import background_dir
from .batches import model_columns
from .features import FEATURES, compute_feature
from .schema import (
    BACKGROUND_COLUMN,
    ENSEMBLE_COLUMN,
    FIXED_COLUMNS,
    MEMBER_PREFIX,
    MEMBER_TOTAL_PREFIXES,
    ScoresMeta,
    totals_for,
)

__all__ = ["DETECTORS_KEY", "Companion", "DetectorPlan", "batch_columns", "log_mean_exp", "plan",
           "plan_metadata"]


def log_mean_exp(values: np.ndarray) -> np.ndarray:
    """log (1/M) sum_j exp(values[j]) over axis 0 ([M, N] -> [N]), in float64.

    The ensemble's log density log((1/M) sum_j p_j(x)) from the members' log p_j(x).
    ``logaddexp.reduce`` subtracts the running max, so values near -1e4 nats do not
    underflow, and an all ``-inf`` column stays ``-inf``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"log_mean_exp takes [M, N] with M >= 1, got shape {v.shape}")
    return np.logaddexp.reduce(v, axis=0) - math.log(v.shape[0])


@dataclass
class Companion:
    """Another model scored on the same x: a background model or an ensemble member."""

    column: str  # its log_px column
    model: DensityModel
    info: CheckpointInfo
    label: str  # "background", "member 1", ... (messages)
    totals: dict[str, list[str]] = field(default_factory=dict)  # column -> its terms to sum

    @property
    def columns(self) -> list[str]:
        return [self.column, *self.totals]

    def score(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        terms = {k: v.double() for k, v in self.model.score_columns(x)[0].items()}
        out = {self.column: sum_terms(terms).cpu().numpy()}
        for column, members in self.totals.items():
            out[column] = sum_terms({m: terms[m] for m in members}).cpu().numpy()
        return out


@dataclass
class DetectorPlan:
    detectors: list[str]  # selected, in registry order
    companions: list[Companion] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    level_dims: list[int] | None = None
    held_out: bool = False

    @property
    def members(self) -> list[Companion]:
        return [c for c in self.companions if c.column.startswith(MEMBER_PREFIX)]

    @property
    def columns(self) -> list[str]:
        """The extra columns the scorer writes for this plan, in schema order."""
        cols = [c for comp in self.companions for c in comp.columns]
        if self.members:
            cols.append(ENSEMBLE_COLUMN)
        return [*cols, *self.features]

    def batch_columns(self, cols: dict[str, np.ndarray], x: torch.Tensor,
                      images: torch.Tensor) -> None:
        batch_columns(self, cols, x, images)


def latent_level_dims(model: DensityModel, terms: list[str],
                      device: torch.device) -> list[int] | None:
    """Dimensions factored out at each level of a multi-scale flow (they sum to D), from
    the model's ``encode`` (one latent per level, level 0 first); None for other models."""
    n_levels = sum(t.startswith("log_pz_level") for t in terms)
    encode = getattr(model, "encode", None)
    if n_levels < 2 or encode is None:
        return None
    with torch.inference_mode():
        zs = encode(torch.full((1, *model.input_shape), 0.5, device=device))
    dims = [int(z[0].numel()) for z in zs]
    if len(dims) != n_levels or sum(dims) != math.prod(model.input_shape):
        return None
    return dims


def _load_companion(path: Path, info: CheckpointInfo, column: str, label: str,
                    device: torch.device, distinct: bool = True) -> Companion:
    """Load another model of the same images and data; ``distinct``: it may not be the
    run's own checkpoint (an ensemble member; a background may, giving a zero ratio)."""
    model, other = load_checkpoint(path, device)
    if tuple(other.input_shape) != tuple(info.input_shape):
        raise UserError(f"{label} {path} takes {'x'.join(map(str, other.input_shape))} inputs, "
                        f"the run {'x'.join(map(str, info.input_shape))}: it must model the "
                        "same images")
    if other.dataset != info.dataset:
        raise UserError(f"{label} {path} was trained on {other.dataset}, the run on "
                        f"{info.dataset}: it must be trained on the same data")
    if distinct and other.sha256 == info.sha256:
        raise UserError(f"{label} {path} is the run's own checkpoint; name another model")
    model.eval()
    return Companion(column, model, other, label)


def _member_totals(comp: Companion, index: int, device: torch.device) -> dict[str, list[str]]:
    """``{"log_pz_member{i}": [its log_pz_level terms], "logdet_member{i}": [...]}``."""
    terms, _ = model_columns(comp.model, device)
    return {f"{MEMBER_TOTAL_PREFIXES[total]}{index}": members
            for total, members in totals_for(terms).items()}


def prospective_table(columns: list[str], jobs) -> pd.DataFrame:
    """A stand-in of the table ``score`` will write: two rows per set, every column, all
    values 0. Detectors check it for what they need before anything is scored."""
    rows = []
    for job in jobs:
        for _ in range(2):
            rows.append({"dataset": job.images.name, "role": job.role,
                         "split": job.images.split, "transform": job.transform})
    df = pd.DataFrame(rows, columns=["dataset", "role", "split", "transform"])
    for c in columns:
        if c not in df.columns:
            df[c] = 0.0
    return df


def plan(rd: RunDir, model: DensityModel, info: CheckpointInfo, jobs, *,
         detectors: list[str] | None, members: list[Path], terms: list[str],
         extra_columns: list[str], device: torch.device,
         held_out: bool = False) -> DetectorPlan:
    """Choose the detectors and load what they need; UserError (before any scoring) for
    an unknown detector or a named one whose inputs cannot be had.

    ``detectors=None``: every registered detector whose needs are met. ``members``: the
    other ensemble members' run folders (member 0 is the run). ``terms``,
    ``extra_columns``: the model's columns (``scorer.model_columns``).
    """
    if detectors is not None:
        unknown = [d for d in detectors if d not in DETECTORS]
        if unknown:
            raise UserError(f"unknown detector {unknown[0]!r}; choose from "
                            f"{', '.join(DETECTORS)}")
    wanted = set(DETECTORS) if detectors is None else set(detectors)
    companions: list[Companion] = []
    bg = background_dir(rd)
    if "likelihood-ratio" in wanted and bg.model.exists():
        companions.append(_load_companion(bg.model, info, BACKGROUND_COLUMN, "background model",
                                          device, distinct=False))
    seen = {info.sha256}
    for i, member in enumerate(members, start=1):
        mrd = resolve_run(Path(member))
        comp = _load_companion(mrd.model, info, f"{MEMBER_PREFIX}{i}", f"member {i}", device)
        if comp.info.sha256 in seen:
            raise UserError(f"--member {member} repeats a model already in the ensemble")
        seen.add(comp.info.sha256)
        comp.totals = _member_totals(comp, i, device)
        companions.append(comp)
    features = [f.column for f in FEATURES.values() if f.detector in wanted and f.available()]
    dims = latent_level_dims(model, terms, device)
    p = DetectorPlan([], companions, features, dims, held_out)
    # The metadata the finished table will carry, as far as the detectors read it.
    future = ScoresMeta(
        version="", schema_version="", model=info.model, in_dataset=info.dataset,
        terms=terms, run_config=info.run_config, checkpoint_sha256=info.sha256,
        dequant_seed=0, extra={} if dims is None else {LEVEL_DIMS_KEY: json.dumps(dims)},
        extra_columns=[*extra_columns, *p.columns])
    columns = [*FIXED_COLUMNS, *terms, *totals_for(terms), *extra_columns, *p.columns]
    table = prospective_table(columns, jobs)
    for name, det in DETECTORS.items():
        if name not in wanted:
            continue
        why = det.missing(table, future)
        if why is None:
            p.detectors.append(name)
        elif detectors is not None:
            raise UserError(why)
    return p


def batch_columns(p: DetectorPlan, cols: dict[str, np.ndarray], x: torch.Tensor,
                  images: torch.Tensor) -> None:
    """Add the plan's columns for one batch to ``cols`` (which holds the run's ``log_px``).

    ``x``: the dequantized batch the run's model scored; ``images``: its uint8 pixels
    ``[B, C, H, W]`` (for the data features).
    """
    for comp in p.companions:
        cols.update(comp.score(x))
    if p.members:
        stacked = np.stack([cols["log_px"], *(cols[c.column] for c in p.members)])
        cols[ENSEMBLE_COLUMN] = log_mean_exp(stacked)
    for name in p.features:
        cols[name] = compute_feature(name, images)


def plan_metadata(p: DetectorPlan, jobs) -> dict[str, str]:
    """ScoresMeta.extra entries saying what the detectors are and where their inputs came
    from: all known before scoring (the typicality entropy estimate is a read-time value)."""
    out: dict[str, str] = {DETECTORS_KEY: json.dumps(p.detectors)}
    if p.level_dims is not None:
        out[LEVEL_DIMS_KEY] = json.dumps(p.level_dims)
    for comp in p.companions:
        train = (comp.info.run_config.get("train") or {})
        entry = {"path": str(comp.info.path), "sha256": comp.info.sha256,
                 "epoch": comp.info.epoch, "model": comp.info.model}
        if comp.column == BACKGROUND_COLUMN:
            entry.update(mu=train.get("perturb_mu"), weight_decay=train.get("weight_decay"))
            out["background"] = json.dumps(entry)
        else:
            out[f"member{comp.column[len(MEMBER_PREFIX):]}"] = json.dumps(entry)
    if p.members:
        out["ensemble_size"] = str(len(p.members) + 1)
    train_jobs = [j for j in jobs if j.role == "in" and j.images.split == "train"]
    if train_jobs:
        j = train_jobs[0]
        first, last = j.first_index, j.first_index + len(j.images) - 1
        kind = ("held out: train images the model never saw" if p.held_out
                else "training images (the first ones of the train split)")
        out["train_rows"] = f"{j.images.name} train images {first}..{last}, {kind}"
    return out
