"""What ``ood-audit score`` adds for the detectors beyond the model's own terms.

After the run's model has scored every set (:func:`~ood_audit.scoring.scorer.score_jobs`),
:func:`add_detectors` adds, per image,

- ``log_px_background``: log p(x) under the run's background model ``RUN/background``
  (likelihood ratio, Ren et al. 2019), on exactly the same dequantized x (the noise is
  seeded by set and chunk, not by model);
- ``log_px_member{i}``, i >= 1: log p(x) under each ``--member`` run (WAIC; member 0 is
  the run itself, ``log_px``);
- data features such as ``png_bits`` (input complexity, Serra et al. 2020);
- ``score_<name>`` for every selected detector but ``likelihood`` (which is ``log_px``),

and rewrites the Parquet atomically with these as extra columns and with what they came
from in the metadata (background mu and checkpoint, members, level sizes, the entropy
estimate and which train rows gave it).

:func:`plan` decides all of that *before* any scoring, so a named detector whose inputs
cannot be had (no background model, no ensemble, no levels) fails at once with one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..analysis import typicality
from ..analysis.detectors import (
    DETECTORS,
    LEVEL_DIMS_KEY,
    SCORE_PREFIX,
    compute_detector,
)
from ..errors import UserError
from ..models.base import DensityModel
from ..runs import RunDir, atomic_path, resolve_run
from ..training.background import background_dir
from ..training.checkpoint import CheckpointInfo, load_checkpoint
from .features import FEATURES, compute_feature
from .schema import (
    BACKGROUND_COLUMN,
    FIXED_COLUMNS,
    MEMBER_PREFIX,
    ScoresMeta,
    arrow_schema,
    read_scores,
    totals_for,
)

#: ScoresMeta.extra key listing the detectors ``score`` wrote (JSON list).
DETECTORS_KEY = "detectors"


@dataclass
class Companion:
    """Another model scored on the same images: a background model or an ensemble member."""

    column: str
    model: DensityModel
    info: CheckpointInfo
    label: str  # "background", "member 1", ... (progress and messages)


@dataclass
class DetectorPlan:
    detectors: list[str]  # selected, in registry order
    companions: list[Companion] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    level_dims: list[int] | None = None
    held_out: bool = False


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

    ``detectors=None``: every registered detector whose needs are met. ``terms``,
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
        companions.append(comp)
    features = [f.column for f in FEATURES.values() if f.detector in wanted and f.available()]
    dims = latent_level_dims(model, terms, device)
    # The metadata the finished table will carry, as far as the detectors read it.
    future = ScoresMeta(
        version="", schema_version="", model=info.model, in_dataset=info.dataset,
        terms=terms, run_config=info.run_config, checkpoint_sha256=info.sha256,
        dequant_seed=0, extra={} if dims is None else {LEVEL_DIMS_KEY: json.dumps(dims)},
        extra_columns=list(extra_columns))
    columns = [*FIXED_COLUMNS, *terms, *totals_for(terms), *extra_columns,
               *[c.column for c in companions], *features]
    table = prospective_table(columns, jobs)
    chosen = []
    for name, det in DETECTORS.items():
        if name not in wanted:
            continue
        why = det.missing(table, future)
        if why is None:
            chosen.append(name)
        elif detectors is not None:
            raise UserError(why)
    return DetectorPlan(chosen, companions, features, dims, held_out)


def _companion_log_px(comp: Companion, jobs, *, batch_size: int, device: torch.device,
                      seed: int, progress) -> dict[tuple, np.ndarray]:
    from .scorer import score_images

    out = {}
    for job in jobs:
        shown = dataclasses.replace(job, images=dataclasses.replace(
            job.images, name=f"{job.images.name} [{comp.label}]"))
        progress.set_start(shown, len(job.images))
        parts = []
        t0 = time.perf_counter()
        for cols in score_images(comp.model, job, batch_size, device, seed):
            parts.append(cols["log_px"])
            n = len(cols["log_px"])
            progress.advance(n, n / max(time.perf_counter() - t0, 1e-9))
            t0 = time.perf_counter()
        out[_job_key(job)] = np.concatenate(parts)
    return out


def _job_key(job) -> tuple:
    return (job.images.name, job.images.split, job.transform)


def _rows_of(df: pd.DataFrame, job) -> np.ndarray:
    """Row positions of ``job``'s images in ``df``, in image order."""
    mask = ((df["dataset"] == job.images.name) & (df["split"] == job.images.split)
            & (df["transform"] == job.transform) & (df["role"] == job.role)).to_numpy()
    pos = np.flatnonzero(mask)
    order = np.argsort(df["index"].to_numpy()[pos], kind="stable")
    pos = pos[order]
    if len(pos) != len(job.images):
        raise RuntimeError(f"{job.images.name}: {len(pos)} rows for {len(job.images)} images")
    return pos


def add_detectors(path: Path, p: DetectorPlan, jobs, *, batch_size: int, device: torch.device,
                  seed: int, progress=None) -> list[str]:
    """Add companion, feature and ``score_<name>`` columns to the scores at ``path``
    (rewritten atomically); returns the detectors written."""
    from .scorer import ScoreProgress

    progress = progress or ScoreProgress()
    df, meta = read_scores(path)
    new_columns: dict[str, np.ndarray] = {}
    for comp in p.companions:
        values = _companion_log_px(comp, jobs, batch_size=batch_size, device=device, seed=seed,
                                   progress=progress)
        col = np.full(len(df), np.nan)
        for job in jobs:
            col[_rows_of(df, job)] = values[_job_key(job)]
        new_columns[comp.column] = col
    for name in p.features:
        col = np.full(len(df), np.nan)
        for job in jobs:
            col[_rows_of(df, job)] = compute_feature(name, job.images.images)
        new_columns[name] = col
    for name, values in new_columns.items():
        df[name] = values
    extra = dict(meta.extra)
    extra[DETECTORS_KEY] = json.dumps(p.detectors)
    if p.level_dims is not None:
        extra[LEVEL_DIMS_KEY] = json.dumps(p.level_dims)
    extra.update(_provenance(p, jobs, df))
    meta = dataclasses.replace(meta, extra=extra,
                               extra_columns=[*meta.extra_columns, *new_columns])
    scores = {}
    for name in p.detectors:
        if name != "likelihood":
            scores[f"{SCORE_PREFIX}{name}"] = compute_detector(name, df, meta).to_numpy(float)
    for name, values in scores.items():
        df[name] = values
    groups = list(totals_for(meta.terms))
    schema = arrow_schema(meta.terms, [*groups, *meta.extra_columns], list(scores), meta)
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return p.detectors


def _provenance(p: DetectorPlan, jobs, df: pd.DataFrame) -> dict[str, str]:
    """Metadata saying where the detectors' inputs came from."""
    out: dict[str, str] = {}
    for comp in p.companions:
        train = (comp.info.run_config.get("train") or {})
        entry = {"path": str(comp.info.path), "sha256": comp.info.sha256,
                 "epoch": comp.info.epoch, "model": comp.info.model}
        if comp.column == BACKGROUND_COLUMN:
            entry.update(mu=train.get("perturb_mu"), weight_decay=train.get("weight_decay"))
            out["background"] = json.dumps(entry)
        else:
            out[f"member{comp.column[len(MEMBER_PREFIX):]}"] = json.dumps(entry)
    train_jobs = [j for j in jobs if j.role == "in" and j.images.split == "train"]
    if train_jobs:
        j = train_jobs[0]
        first, last = j.first_index, j.first_index + len(j.images) - 1
        kind = ("held out: train images the model never saw" if p.held_out
                else "training images (the first ones of the train split)")
        out["train_rows"] = f"{j.images.name} train images {first}..{last}, {kind}"
        rows = typicality.entropy_rows(df)
        if len(rows) >= 2:
            out["typicality_entropy_nats"] = f"{typicality.entropy_estimate(rows):.6g}"
    return out
