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
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoint import CheckpointInfo, load_checkpoint
from ..data.transforms import parse_transforms
from ..device import pick_device
from ..distributed import DistContext, dist_env, init_distributed
from ..errors import UserError
from ..faults import keeping
from ..models.base import DensityModel
from ..runs import RunDir
from .batch_fit import ForwardSize
from .batches import model_columns, score_images
from .detect import plan, plan_metadata
from .jobs import ScoreJob, build_jobs, set_key, transforms_meta
from .loader import check_workers
from .noise import Shard
from .pixel_maps import save_pixel_maps
from .schema import SCHEMA_VERSION, SETS_KEY, ScoresMeta, arrow_schema, part_name, totals_for
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

    ``plan``: the detectors' companion models and features, scored in the same batches.
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
        extra={"epoch": str(info.epoch), "device": str(device), "processes": str(ctx.world),
               SETS_KEY: json.dumps([set_key(j) for j in jobs]),
               **{f"model.{k}": v for k, v in model.extra_metadata().items()},
               **transforms_meta(jobs),
               **({} if plan is None else plan_metadata(plan, jobs))},
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


def score_run(rd: RunDir, ood: list[str], *, root: Path | None = None, download: bool = False,
              limit: int | None = None, train_limit: int | None = 2000, batch_size: int = 256,
              device: str = "auto", seed: int = 0, notify=print,
              progress: ScoreProgress | None = None,
              options: dict[str, object] | None = None,
              detectors: list[str] | None = None, members: list[Path] = (),
              held_out: bool = False,
              transforms: list[str] | tuple[str, ...] = (),
              workers: int | None = None) -> list[SetSummary]:
    """``ood-audit score`` as a library call: writes ``rd.scores`` and returns summaries.

    ``options`` are the model's scoring options (``{"iw_samples": 64}`` for a VAE).
    ``detectors``: the detectors whose inputs to write and whose ``score_<name>`` columns
    readers add (None: every one whose inputs can be had); ``members``: other runs forming
    an ensemble with this one (WAIC, ensemble; an ensemble folder's members come first);
    ``held_out``: train rows from after the model's training ``--limit``. See
    :mod:`ood_audit.scoring.detect`. ``transforms``: tags (``grayscale``,
    ``contrast=0.5``, ``invert``) each scoring a transformed copy of the in-distribution
    test set and every OOD set (:func:`build_jobs`). ``workers``: DataLoader processes
    dequantizing the next chunks while the model scores (None: 2 on CUDA, 0 on CPU);
    the numbers do not depend on it.

    Under torchrun (``WORLD_SIZE`` > 1) every process scores its share of each set
    (:class:`Shard`) into ``scores/part-<rank>.parquet``; only the main process reports
    progress and returns summaries (the others return []).
    """
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    check_workers(workers)
    parse_transforms(list(transforms))  # a bad --transform fails before the model loads
    # under torchrun the rank picks its GPU (cuda:LOCAL_RANK); alone, --device is checked as usual
    ctx = init_distributed(device if dist_env()[1] > 1 else pick_device(device))
    dev = ctx.device
    if not ctx.is_main:
        notify, progress = (lambda m: None), None
    before = folder_identity(rd.scores)
    # what a fault keeps, looked at when its line is made (ood_audit.faults)
    with keeping(lambda: _scores_kept(rd.scores, before)):
        failure: Exception | None = None
        try:
            model, info = load_checkpoint(rd.model, dev)
            for name, value in (options or {}).items():
                model.set_score_option(name, value)
            jobs = build_jobs(info, ood, root=root, download=download, limit=limit,
                              train_limit=train_limit, seed=seed, notify=notify,
                              held_out=held_out, transforms=transforms)
            terms, extras = model_columns(model, dev)
            all_members = [*rd.ensemble_members()[1:], *members]
            chosen = plan(rd, model, info, jobs, detectors=detectors, members=all_members,
                          terms=terms, extra_columns=extras, device=dev, held_out=held_out)
        except Exception as exc:  # noqa: BLE001 - under torchrun every rank learns of it
            failure = exc
        ctx.agree(failure)  # one rank's unreadable data or full memory stops them all
        summaries = score_jobs(model, info, jobs, rd.scores, batch_size=batch_size, device=dev,
                               seed=seed, progress=progress, plan=chosen, ctx=ctx,
                               workers=workers, notify=notify)
        if ctx.is_main:
            with contextlib.suppress(FileNotFoundError):
                rd.legacy_scores.unlink()  # superseded by scores/; readers would prefer it anyway
            save_pixel_maps(model, jobs, rd.pixel_maps, dev, seed)
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
