"""What ``score`` writes for the detectors beyond the model's own terms.

The detectors' needs (:mod:`.needs`) that cost work are supplied here, *before* any
scoring, so a named detector whose inputs cannot be had (no background model, no
ensemble) fails at once with one line; the batch loop then adds, on exactly the x the
run's model saw (the noise is seeded by set and chunk, not model), the per-image inputs
(:meth:`InputPlan.batch_columns`):

- ``log_px_background``: log p(x) under the run's background model ``RUN/background``
  (needed by :class:`~.needs.BackgroundModel`);
- ``log_px_member{i}``, i >= 1, and its group totals ``log_pz_member{i}``,
  ``logdet_member{i}``: each other ensemble member (``--member`` runs, or the members of
  an ensemble folder; member 0 is the run itself), and ``log_px_ensemble``, the log of
  the members' mean density;
- data features such as ``png_bits`` (needed by :class:`~.needs.DataFeature`);
- any other per-image :class:`Computation` a provider adds: ``likelihood_regret``, a
  VAE's encoder re-fit to each image (:mod:`.refit`; needed by :class:`~.needs.EncoderRefit`);
- the latent size of each level of a multi-scale flow (metadata ``level_dims``).

Which detectors those inputs serve is decided above, by ``ood_audit.commands.score``;
nothing here names a detector. A new kind of input registers its provider in
:data:`PROVIDERS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..checkpoint import CheckpointInfo, load_checkpoint
from ..errors import UserError
from ..models.base import DensityModel, sum_terms
from ..models.regret import RefitSettings, supports_refit
from ..runs import RunDir, resolve_run
from .batches import model_columns
from .features import FEATURES, compute_feature
from .needs import BackgroundModel, DataFeature, EncoderRefit, Need
from .refit import RegretComputation
from .schema import (
    BACKGROUND_COLUMN,
    BACKGROUND_KEY,
    DETECTORS_KEY,
    ENSEMBLE_COLUMN,
    ENSEMBLE_SIZE_KEY,
    LEVEL_DIMS_KEY,
    MEMBER_KEY_PREFIX,
    MEMBER_PREFIX,
    MEMBER_TOTAL_PREFIXES,
    TRAIN_ROWS_HELD_OUT_KEY,
    TRAIN_ROWS_KEY,
    totals_for,
)


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


class Computation(Protocol):
    """A per-image input computed in the batch loop by a provider of a new kind of need
    (a per-image optimisation such as likelihood regret): its columns, and the values of
    one batch from the x the run's model saw and the uint8 pixels. It may report its own
    progress; the scorer's shows the images scored."""

    columns: list[str]

    def __call__(self, cols: dict[str, np.ndarray], x: torch.Tensor,
                 images: torch.Tensor) -> dict[str, np.ndarray]: ...


@dataclass
class InputPlan:
    """The extra inputs one ``score`` writes, loaded before any scoring."""

    companions: list[Companion] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    computations: list[Computation] = field(default_factory=list)
    level_dims: list[int] | None = None
    held_out: bool = False
    detectors: list[str] = field(default_factory=list)  # the detectors they serve (metadata)

    @property
    def members(self) -> list[Companion]:
        return [c for c in self.companions if c.column.startswith(MEMBER_PREFIX)]

    @property
    def columns(self) -> list[str]:
        """The extra columns the scorer writes for this plan, in schema order."""
        cols = [c for comp in self.companions for c in comp.columns]
        if self.members:
            cols.append(ENSEMBLE_COLUMN)
        return [*cols, *self.features, *(c for comp in self.computations for c in comp.columns)]

    def batch_columns(self, cols: dict[str, np.ndarray], x: torch.Tensor,
                      images: torch.Tensor) -> None:
        """Add this plan's columns for one batch to ``cols`` (which holds the run's
        ``log_px``). ``x``: the dequantized batch the run's model scored; ``images``: its
        uint8 pixels ``[B, C, H, W]`` (for the data features)."""
        for comp in self.companions:
            cols.update(comp.score(x))
        if self.members:
            stacked = np.stack([cols["log_px"], *(cols[c.column] for c in self.members)])
            cols[ENSEMBLE_COLUMN] = log_mean_exp(stacked)
        for name in self.features:
            cols[name] = compute_feature(name, images)
        for computation in self.computations:
            cols.update(computation(cols, x, images))

    def metadata(self, jobs) -> dict[str, str]:
        """ScoresMeta.extra entries saying what the detectors are and where their inputs
        came from: all known before scoring (fitted values are read-time ones)."""
        out: dict[str, str] = {DETECTORS_KEY: json.dumps(self.detectors)}
        if self.level_dims is not None:
            out[LEVEL_DIMS_KEY] = json.dumps(self.level_dims)
        for comp in self.companions:
            train = (comp.info.run_config.get("train") or {})
            entry = {"path": str(comp.info.path), "sha256": comp.info.sha256,
                     "epoch": comp.info.epoch, "model": comp.info.model}
            if comp.column == BACKGROUND_COLUMN:
                entry.update(mu=train.get("perturb_mu"), weight_decay=train.get("weight_decay"))
                out[BACKGROUND_KEY] = json.dumps(entry)
            else:
                out[f"{MEMBER_KEY_PREFIX}{comp.column[len(MEMBER_PREFIX):]}"] = json.dumps(entry)
        if self.members:
            out[ENSEMBLE_SIZE_KEY] = str(len(self.members) + 1)
        for computation in self.computations:
            out.update(getattr(computation, "metadata", dict)())
        out.update(self.train_rows_metadata(jobs))
        return out

    def train_rows_metadata(self, jobs) -> dict[str, str]:
        """Which train images the in-distribution train rows are, in words
        (``train_rows``) and whether the model never saw them (``train_rows_held_out``):
        known before scoring, so a detector that fits on them can refuse a leak at once."""
        train_jobs = [j for j in jobs if j.role == "in" and j.images.split == "train"]
        if not train_jobs:
            return {}
        j = train_jobs[0]
        first, last = j.first_index, j.first_index + len(j.images) - 1
        kind = ("held out: train images the model never saw" if self.held_out
                else "training images (the first ones of the train split)")
        return {TRAIN_ROWS_KEY: f"{j.images.name} train images {first}..{last}, {kind}",
                TRAIN_ROWS_HELD_OUT_KEY: "true" if self.held_out else "false"}


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


def load_companion(path: Path, info: CheckpointInfo, column: str, label: str,
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


@dataclass
class Context:
    """What a provider may use: the run, its model and checkpoint, the device."""

    rd: RunDir
    model: DensityModel
    info: CheckpointInfo
    device: torch.device


def _background(need: BackgroundModel, ctx: Context, plan: InputPlan) -> None:
    """The run's background model, when it has one (else the need stays unmet)."""
    bg = ctx.rd.background
    if bg.model.exists():
        plan.companions.append(load_companion(bg.model, ctx.info, BACKGROUND_COLUMN,
                                              "background model", ctx.device, distinct=False))


def _feature(need: DataFeature, ctx: Context, plan: InputPlan) -> None:
    """A data feature, when this Pillow can compute it (else the need stays unmet)."""
    feature = FEATURES.get(need.column)
    if feature is not None and feature.available() and need.column not in plan.features:
        plan.features.append(need.column)


def _refit(need: EncoderRefit, ctx: Context, plan: InputPlan) -> None:
    """Likelihood regret's per-image re-fit, for a model with an encoder to re-fit (a VAE;
    else the need stays unmet)."""
    if supports_refit(ctx.model):
        settings = RefitSettings(steps=need.steps, lr=need.lr, weight_decay=need.weight_decay,
                                 iw_samples=need.iw_samples)
        plan.computations.append(RegretComputation(ctx.model, settings))


#: Need type -> how the scorer supplies it. Needs not listed cost no work here: the
#: columns every table has, train rows (scored by --train-limit), the level terms.
PROVIDERS: dict[type[Need], Callable[[Need, Context, InputPlan], None]] = {
    BackgroundModel: _background,
    DataFeature: _feature,
    EncoderRefit: _refit,
}


def prepare_inputs(needs: list[Need], rd: RunDir, model: DensityModel, info: CheckpointInfo, *,
                   members: list[Path], terms: list[str], device: torch.device,
                   held_out: bool = False) -> InputPlan:
    """Load what ``needs`` (the wanted detectors' needs) and ``members`` (the other
    ensemble members' run folders; member 0 is the run) ask for; UserError for a member
    that cannot be used. ``terms``: the model's (``batches.model_columns``)."""
    plan = InputPlan(held_out=held_out)
    ctx = Context(rd, model, info, device)
    for need in dict.fromkeys(needs):  # each once, in the order the detectors list them
        provide = PROVIDERS.get(type(need))
        if provide is not None:
            provide(need, ctx, plan)
    seen = {info.sha256}
    for i, member in enumerate(members, start=1):
        comp = load_companion(resolve_run(Path(member)).model, info, f"{MEMBER_PREFIX}{i}",
                              f"member {i}", device)
        if comp.info.sha256 in seen:
            raise UserError(f"--member {member} repeats a model already in the ensemble")
        seen.add(comp.info.sha256)
        member_terms, _ = model_columns(comp.model, device)
        comp.totals = {f"{MEMBER_TOTAL_PREFIXES[total]}{i}": group
                       for total, group in totals_for(member_terms).items()}
        plan.companions.append(comp)
    plan.level_dims = latent_level_dims(model, terms, device)
    return plan
