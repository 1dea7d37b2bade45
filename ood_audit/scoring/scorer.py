"""The batched scorer: every term of log p(x), per image, streamed to Parquet.

The scorer never special-cases a model family: it writes whatever named terms the
model's ``log_prob_terms`` returns, then ``log_px`` (their sum), ``bpd``, and the group
totals of :data:`~ood_audit.scoring.schema.TERM_GROUPS`.

Dequantization noise is drawn per chunk of :data:`NOISE_CHUNK` images from a generator
seeded by (seed, data set, chunk), so an image's score does not depend on the batch
size or on how a set is split across processes.

Transforms (``score --transform``, :mod:`ood_audit.data.transforms`) add, per transform,
a copy of the in-distribution test set and of every OOD set with the transform applied
to their uint8 pixels; these rows keep their role and carry the transform's tag in the
``transform`` column (``none`` for the untransformed sets, which are always scored).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoint import CheckpointInfo, load_checkpoint
from ..config import ScoreConfig
from ..device import pick_device
from ..distributed import DistContext, dist_env, init_distributed
from ..faults import keeping
from ..models.base import DensityModel
from ..runs import RunDir
from .batch_fit import ForwardSize
from .batches import model_columns, score_images
from .companions import InputPlan
from .jobs import ScoreJob, build_jobs, set_key, transforms_meta
from .noise import Shard
from .parquet import arrow_schema
from .pixel_maps import save_pixel_maps
from .schema import (
    DEVICE_KEY,
    EPOCH_KEY,
    PROCESSES_KEY,
    SCHEMA_VERSION,
    SETS_KEY,
    ScoresMeta,
    part_name,
    totals_for,
)
from .writer import ScoresWriter, SetSummary, SetTotals, folder_identity, scores_folder, summarize


class ScoreProgress:
    """Progress callbacks the CLI implements; the defaults stay silent."""

    def set_start(self, job: ScoreJob, n_images: int) -> None:
        """Scoring of one set starts."""

    def advance(self, n_images: int, images_per_s: float) -> None:
        """``n_images`` more images of the current set are scored."""


def score_jobs(model: DensityModel, info: CheckpointInfo, jobs: list[ScoreJob], out: Path, *,
               batch_size: int, device: torch.device, seed: int,
               progress: ScoreProgress | None = None, plan=None,
               ctx: DistContext | None = None, workers: int | None = None,
               notify=None) -> list[SetSummary]:
    """Score every job into the folder ``out`` (``part-<rank>.parquet``, one per process,
    published atomically once every process is done) and return per-set summaries (on
    the main process; [] on the others).

    ``plan``: the detectors' extra inputs (:class:`~.companions.InputPlan`: companion
    models, data features), scored in the same batches.
    ``ctx``: this process's place in a torchrun group (None: a single process).
    ``workers``: DataLoader processes dequantizing ahead (None: 2 on CUDA, 0 on CPU).
    ``notify``: where the one note goes when CUDA memory forces smaller forward passes.
    """
    ctx = ctx or DistContext(device=device)
    progress = progress or ScoreProgress()
    shard = Shard(ctx.rank, ctx.world)
    terms, extras = model_columns(model, device)
    groups = totals_for(terms)
    plan_columns = [] if plan is None else plan.columns
    meta = ScoresMeta(
        version=__version__, schema_version=SCHEMA_VERSION, model=info.model,
        in_dataset=info.dataset, terms=terms, run_config=info.run_config,
        checkpoint_sha256=info.sha256, dequant_seed=seed,
        adaptations={j.images.name: j.images.adaptation for j in jobs if j.images.adaptation},
        extra={EPOCH_KEY: str(info.epoch), DEVICE_KEY: str(device), PROCESSES_KEY: str(ctx.world),
               SETS_KEY: json.dumps([set_key(j) for j in jobs]),
               **{f"model.{k}": v for k, v in model.extra_metadata().items()},
               **transforms_meta(jobs),
               **({} if plan is None else plan.metadata(jobs))},
        extra_columns=[*extras, *plan_columns],
    )
    schema = arrow_schema(terms, [*groups, *extras, *plan_columns], [], meta)
    # Means shown on screen: a flow's group totals, else the model's terms.
    keys = ["bpd", "log_px", *(groups or terms)]
    tallies: list[tuple[tuple[str, ...], SetTotals]] = []
    fit = ForwardSize(batch_size, notify)
    model.eval()
    with scores_folder(out, ctx) as tmp:
        writer = ScoresWriter(tmp / part_name(ctx.rank), schema, shown=out / part_name(ctx.rank))
        try:
            for job in jobs:
                n_dims = math.prod(job.images.shape)
                progress.set_start(job, shard.size(len(job.images)))
                tally = SetTotals(keys, shard.size(len(job.images)))
                tallies.append((tuple(set_key(job)), tally))
                t0 = time.perf_counter()
                for cols in score_images(model, job, batch_size, device, seed, shard=shard,
                                         plan=plan, workers=workers, fit=fit):
                    for total, members in groups.items():
                        cols[total] = np.sum([cols[m] for m in members], axis=0)
                    b = len(cols["log_px"])
                    cols.update(dataset=[job.images.name] * b, role=[job.role] * b,
                                split=[job.images.split] * b, transform=[job.transform] * b,
                                n_dims=np.full(b, n_dims, dtype=np.int64))
                    tally.add(cols)
                    writer.write(cols)
                    progress.advance(b, b / max(time.perf_counter() - t0, 1e-9))
                    t0 = time.perf_counter()
        except BaseException:
            writer.abort()
            raise
        writer.close()
    if ctx.world == 1:  # the running sums hold every row: no need to read the table back
        return [tally.summary(key) for key, tally in tallies]
    return summarize(out, keys) if ctx.is_main else []


#: ``(model, checkpoint info, jobs, device) -> InputPlan``: what the detectors need
#: beyond the model's terms (``ood_audit.commands.score`` decides).
InputsFor = Callable[[DensityModel, CheckpointInfo, list[ScoreJob], torch.device], InputPlan | None]


def write_scores(rd: RunDir, cfg: ScoreConfig, *, root: Path | None = None, download: bool = False,
                 notify=print, progress: ScoreProgress | None = None,
                 inputs_for: InputsFor | None = None,
                 loaded: tuple[DensityModel, CheckpointInfo] | None = None) -> list[SetSummary]:
    """Score the sets of ``cfg`` with the run's checkpoint into ``rd.scores`` and return
    per-set summaries: the scoring half of ``ood-audit score`` (the command adds the
    lock, the choice of detectors and the summary of their AUROCs).

    ``inputs_for`` is called once the model and the sets are loaded, before anything is
    scored, and returns the extra inputs to write (:class:`~.companions.InputPlan`;
    None: the model's terms only). Under torchrun (``WORLD_SIZE`` > 1) every process
    scores its share of each set (:class:`~.noise.Shard`) into
    ``scores/part-<rank>.parquet``; only the main process reports progress and returns
    summaries (the others return []).

    ``loaded``: a model already in memory with its info (the Python API,
    :mod:`ood_audit.api`), scored instead of the run's checkpoint; None: load
    ``rd.model``.
    """
    # under torchrun the rank picks its GPU (cuda:LOCAL_RANK); alone, --device is checked as usual
    ctx = init_distributed(cfg.device if dist_env()[1] > 1 else pick_device(cfg.device))
    dev = ctx.device
    if not ctx.is_main:
        notify, progress = (lambda m: None), None
    before = folder_identity(rd.scores)
    # what a fault keeps, looked at when its line is made (ood_audit.faults)
    with keeping(lambda: _scores_kept(rd.scores, before)):
        failure: Exception | None = None
        try:
            model, info = (load_checkpoint(rd.model, dev) if loaded is None
                           else (loaded[0].to(dev), loaded[1]))
            for name, value in cfg.model_options().items():
                model.set_score_option(name, value)
            jobs = build_jobs(info, cfg.ood, root=root, download=download, limit=cfg.limit,
                              train_limit=cfg.train_limit, seed=cfg.seed, notify=notify,
                              held_out=cfg.held_out, transforms=cfg.transforms)
            plan = inputs_for(model, info, jobs, dev) if inputs_for is not None else None
        except Exception as exc:  # noqa: BLE001 - under torchrun every rank learns of it
            failure = exc
        ctx.agree(failure)  # one rank's unreadable data or full memory stops them all
        summaries = score_jobs(model, info, jobs, rd.scores, batch_size=cfg.batch_size,
                               device=dev, seed=cfg.seed, progress=progress, plan=plan, ctx=ctx,
                               workers=cfg.workers, notify=notify)
        if ctx.is_main:
            with contextlib.suppress(FileNotFoundError):
                rd.legacy_scores.unlink()  # superseded by scores/; readers would prefer it anyway
            save_pixel_maps(model, jobs, rd.pixel_maps, dev, cfg.seed)
    return summaries


def _scores_kept(out: Path, before: tuple[int, int] | None) -> str:
    """What a failed ``score`` left in ``out``: the folder is swapped in whole, so the
    previous table, or (a failure after publishing) the complete new one."""
    now = folder_identity(out)
    if now == before:
        return f"previous scores kept ({out} as it was)" if before else "no scores written"
    if now is None:
        return f"{out} is gone (removed while scoring?)"
    return f"the new scores in {out} are complete"
