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
import dataclasses
import json
import math
import shutil
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import __version__
from ..data import ImageSet, adapt_to_shape, bits_per_dim, dequantize, load_dataset
from ..data.transforms import describe, parse_transforms
from ..distributed import DistContext
from ..errors import UserError
from ..models.base import DensityModel, sum_terms
from ..runs import RunDir, ensure_dir, replace_dir
from ..training.checkpoint import CheckpointInfo, load_checkpoint
from ..training.trainer import pick_device, seeded
from .pixel_maps import save_pixel_maps
from .schema import SCHEMA_VERSION, SETS_KEY, ScoresMeta, arrow_schema, part_name, totals_for

NOISE_CHUNK = 1024  # images dequantized together; fixes the noise independent of batching
ROW_GROUP = 16384  # rows buffered before a Parquet row group is written


@dataclass
class ScoreJob:
    """One data set to score, with its role and tags."""

    images: ImageSet
    role: str  # "in" | "ood"
    transform: str = "none"
    first_index: int = 0  # position of images[0] in its data set (held-out train rows)

    @property
    def key(self) -> int:
        """A stable integer naming (set, split, transform) for seeding its noise."""
        tag = f"{self.images.name}|{self.images.split}|{self.transform}"
        return zlib.crc32(tag.encode())


@dataclass
class SetSummary:
    dataset: str
    role: str
    split: str
    transform: str
    n: int
    means: dict[str, float] = field(default_factory=dict)
    log_px: np.ndarray = field(default_factory=lambda: np.zeros(0))


class ScoreProgress:
    """Progress callbacks the CLI implements; the defaults stay silent."""

    def set_start(self, job: ScoreJob, n_images: int) -> None:
        """Scoring of one set starts."""

    def advance(self, n_images: int, images_per_s: float) -> None:
        """``n_images`` more images of the current set are scored."""


@dataclass(frozen=True)
class Shard:
    """The noise chunks of every set one process scores: chunks rank, rank + world, ...

    Sharding on chunk boundaries keeps every image's noise (seeded by set and chunk)
    and hence every number independent of the number of processes.
    """

    rank: int = 0
    world: int = 1

    def chunks(self, n_images: int) -> list[tuple[int, int]]:
        """``(chunk number, first image)`` of this shard's chunks of an ``n_images`` set."""
        return [(c, start) for c, start in enumerate(range(0, n_images, NOISE_CHUNK))
                if c % self.world == self.rank]

    def size(self, n_images: int) -> int:
        return sum(min(NOISE_CHUNK, n_images - start) for _, start in self.chunks(n_images))


def dequantize_chunk(images: torch.Tensor, c: int, seed: int, key: int) -> torch.Tensor:
    """Noise chunk ``c`` of ``images`` (images ``c * NOISE_CHUNK ..``) dequantized with the
    generator ``seeded(seed, key, c)``: the one definition of the x every score is
    computed on (scorer, DataLoader, second-order analysis)."""
    start = c * NOISE_CHUNK
    return dequantize(images[start:start + NOISE_CHUNK], seeded(seed, key, c))


def dequantized_chunks(images: torch.Tensor, seed: int, key: int,
                       shard: Shard = Shard()) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first image, float chunk)`` of this shard's chunks of ``images``,
    dequantized with per-chunk seeded noise."""
    for c, start in shard.chunks(len(images)):
        yield start, dequantize_chunk(images, c, seed, key)


@torch.inference_mode()
def score_images(model: DensityModel, job: ScoreJob, batch_size: int, device: torch.device,
                 seed: int, *, shard: Shard = Shard(), plan=None) -> Iterator[dict[str, np.ndarray]]:
    """Yield column dicts (numpy, one entry per image) for batches of ``job``'s images.

    ``plan`` (a :class:`~ood_audit.scoring.detect.DetectorPlan`): also score its
    companion models on the same x and add its data features, batch by batch.
    """
    from .detect import batch_columns

    n_dims = math.prod(job.images.shape)
    for start, chunk in dequantized_chunks(job.images.images, seed, job.key, shard):
        # Models that sample while scoring (a VAE's IWAE bound) draw from the global RNG:
        # seed it per chunk (apart from the noise's stream) so a rerun, or a run with
        # another number of processes, gives the same numbers.
        torch.manual_seed(seeded(seed, job.key, start // NOISE_CHUNK, 1).initial_seed())
        for b in range(0, len(chunk), batch_size):
            x = chunk[b:b + batch_size].to(device, non_blocking=True)
            # Sum in float64 so the written terms add up to the written log_px exactly.
            raw_terms, extras = model.score_columns(x)
            terms = {k: v.double() for k, v in raw_terms.items()}
            log_px = sum_terms(terms)
            cols: dict[str, np.ndarray] = {
                "log_px": log_px.cpu().numpy(),
                "bpd": bits_per_dim(log_px, n_dims).cpu().numpy(),
            }
            for name, value in {**terms, **extras}.items():
                cols[name] = value.double().cpu().numpy()
            idx = np.arange(start + b, start + b + len(x), dtype=np.int64)
            cols["index"] = idx + job.first_index
            cols["label"] = job.images.labels[idx].numpy()
            if plan is not None:
                batch_columns(plan, cols, x, job.images.images[start + b:start + b + len(x)])
            yield cols


class ScoresWriter:
    """Streams column batches into one Parquet file, a row group at a time."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema = schema
        self.writer = pq.ParquetWriter(str(path), schema)
        self.buffer: list[pa.RecordBatch] = []
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray | list]) -> None:
        batch = pa.RecordBatch.from_pydict(columns, schema=self.schema)
        self.buffer.append(batch)
        self.rows += batch.num_rows
        if self.rows >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_batches(self.buffer, self.schema))
            self.buffer, self.rows = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def model_columns(model: DensityModel, device: torch.device) -> tuple[list[str], list[str]]:
    """The model's term names and extra column names, read off one tiny forward pass."""
    with torch.inference_mode():
        x = torch.full((1, *model.input_shape), 0.5, device=device)
        terms, extras = model.score_columns(x)
        return list(terms), list(extras)


def build_jobs(info: CheckpointInfo, ood: list[str], *, root: Path | None, download: bool,
               limit: int | None, train_limit: int | None, seed: int,
               notify=print, held_out: bool = False,
               transforms: list[str] | tuple[str, ...] = ()) -> list[ScoreJob]:
    """Load the in-distribution test (and train) split and each OOD set, shape-adapted.

    ``held_out``: the train rows are the ``train_limit`` train images after the first
    ``train.limit`` ones the model was trained on (its ``--limit``), not the first ones.
    ``transforms``: tags such as ``grayscale`` or ``contrast=0.5``; each adds a
    transformed copy of the in-distribution test set and of every OOD set (after their
    shape adaptation), after all untransformed jobs, tagged with the canonical tag.
    """
    parsed = parse_transforms(list(transforms))  # a bad tag fails before any loading
    in_name = info.dataset
    seen = set()
    for name in ood:
        if name == in_name:
            raise UserError(f"--ood {name} is the model's own training set; name another set")
        if name in seen:
            raise UserError(f"--ood {name} is given twice")
        seen.add(name)
    jobs = [ScoreJob(load_dataset(in_name, "test", root=root, download=download,
                                  limit=limit), "in")]
    if held_out:
        jobs.append(held_out_job(info, train_limit, root=root, download=download))
    elif train_limit != 0:
        jobs.append(ScoreJob(load_dataset(in_name, "train", root=root, download=download,
                                          limit=train_limit), "in"))
    for name in ood:
        images = load_dataset(name, "test", root=root, download=download, limit=limit,
                              shape=info.input_shape, seed=seed)
        adapted = adapt_to_shape(images, info.input_shape)
        if adapted.adaptation:
            notify(f"{name}: {adapted.adaptation} to fit the model's input "
                   f"{'x'.join(map(str, info.input_shape))}")
        jobs.append(ScoreJob(adapted, "ood"))
    for job in jobs:
        if len(job.images) == 0:
            raise UserError(f"data set {job.images.name} ({job.images.split}) has no images")
    if parsed:
        bases = [jobs[0], *(j for j in jobs if j.role == "ood")]  # in-dist. test, OOD sets
        for t in parsed:
            jobs += [ScoreJob(t(j.images), j.role, transform=t.tag) for j in bases]
        notify(f"transforms {', '.join(t.tag for t in parsed)}: each applied to "
               f"{', '.join(j.images.name for j in bases)} (uint8 pixels, before dequantization)")
    return jobs


def held_out_job(info: CheckpointInfo, train_limit: int | None, *, root: Path | None,
                 download: bool) -> ScoreJob:
    """Train images the model never saw: those after the first ``train.limit``."""
    trained_on = (info.run_config.get("train") or {}).get("limit")
    if not trained_on:
        raise UserError("--held-out needs a run trained with --limit N (the train images "
                        "after the first N are held out); this run trained on the whole set")
    if train_limit == 0:
        raise UserError("--held-out scores held-out train images: give --train-limit N > 0")
    end = None if train_limit is None else trained_on + train_limit
    images = load_dataset(info.dataset, "train", root=root, download=download, limit=end)
    if len(images) <= trained_on:
        raise UserError(f"{info.dataset} has {len(images)} train images, all used for "
                        f"training (--limit {trained_on}): nothing is held out")
    rest = dataclasses.replace(images, images=images.images[trained_on:].clone(),
                               labels=images.labels[trained_on:].clone())
    return ScoreJob(rest, "in", first_index=trained_on)


def score_jobs(model: DensityModel, info: CheckpointInfo, jobs: list[ScoreJob], out: Path, *,
               batch_size: int, device: torch.device, seed: int,
               progress: ScoreProgress | None = None, plan=None,
               ctx: DistContext | None = None) -> list[SetSummary]:
    """Score every job into the folder ``out`` (``part-<rank>.parquet``, one per process,
    published atomically once every process is done) and return per-set summaries (on
    the main process; [] on the others).

    ``plan``: the detectors' companion models and features, scored in the same batches.
    ``ctx``: this process's place in a torchrun group (None: a single process).
    """
    from .detect import plan_metadata

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
               SETS_KEY: json.dumps([_set_key(j) for j in jobs]),
               **{f"model.{k}": v for k, v in model.extra_metadata().items()},
               **_transforms_meta(jobs),
               **({} if plan is None else plan_metadata(plan, jobs))},
        extra_columns=[*extras, *plan_columns],
    )
    schema = arrow_schema(terms, [*groups, *extras, *plan_columns], [], meta)
    model.eval()
    with scores_folder(out, ctx) as tmp:
        writer = ScoresWriter(tmp / part_name(ctx.rank), schema)
        try:
            for job in jobs:
                n_dims = math.prod(job.images.shape)
                progress.set_start(job, shard.size(len(job.images)))
                t0 = time.perf_counter()
                for cols in score_images(model, job, batch_size, device, seed, shard=shard,
                                         plan=plan):
                    for total, members in groups.items():
                        cols[total] = np.sum([cols[m] for m in members], axis=0)
                    b = len(cols["log_px"])
                    cols.update(dataset=[job.images.name] * b, role=[job.role] * b,
                                split=[job.images.split] * b, transform=[job.transform] * b,
                                n_dims=np.full(b, n_dims, dtype=np.int64))
                    writer.write(cols)
                    progress.advance(b, b / max(time.perf_counter() - t0, 1e-9))
                    t0 = time.perf_counter()
        finally:
            writer.close()
    # Means shown on screen: a flow's group totals, else the model's terms.
    return summarize(out, ["bpd", "log_px", *(groups or terms)]) if ctx.is_main else []


def _set_key(job: ScoreJob) -> list[str]:
    return [job.images.name, job.role, job.images.split, job.transform]


@contextlib.contextmanager
def scores_folder(out: Path, ctx: DistContext) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out`` shared by every process; once all
    of them have written their part, the main process renames it over ``out``.

    A failure leaves ``out`` as it was (the temporary folder is removed by the main
    process when it fails, or by the next successful run).
    """
    out = Path(out)
    name = ctx.broadcast_object(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}" if ctx.is_main else None)
    tmp = out.parent / name
    if ctx.is_main:
        ensure_dir(out.parent)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    ctx.barrier()  # the folder exists before anyone writes into it
    try:
        yield tmp
        ctx.barrier()  # every part is closed
        if ctx.is_main:
            replace_dir(tmp, out)
        ctx.barrier()  # the table is in place before anyone reads it
    finally:
        if ctx.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def summarize(path: Path, keys: list[str]) -> list[SetSummary]:
    """Per-set means of ``keys`` and the log_px of each set, read from the finished table
    (only the columns needed), sets in scoring order."""
    from .schema import canonical_order, scores_files

    columns = ["dataset", "role", "split", "transform", "index", "n_dims", *keys]
    frames, meta = [], None
    for part in scores_files(path):
        # dictionary-encoded strings: categoricals, not one Python str per row
        table = pq.read_table(part, columns=list(dict.fromkeys(columns)),
                              read_dictionary=["dataset", "role", "split", "transform"])
        meta = meta or ScoresMeta.from_arrow(table.schema.metadata, part)
        frames.append(table.to_pandas())
    df = canonical_order(pd.concat(frames, ignore_index=True), meta)
    out = []
    for (dataset, role, split, transform), rows in df.groupby(
            ["dataset", "role", "split", "transform"], sort=False, observed=True):
        out.append(SetSummary(
            dataset=dataset, role=role, split=split, transform=transform, n=len(rows),
            means={k: float(rows[k].mean()) for k in keys}, log_px=rows["log_px"].to_numpy()))
    return out


def _transforms_meta(jobs: list[ScoreJob]) -> dict[str, str]:
    """``{"transforms": JSON {tag: what it does}}`` when any job is transformed."""
    tags = list(dict.fromkeys(j.transform for j in jobs if j.transform != "none"))
    return {"transforms": json.dumps({t: describe(t) for t in tags})} if tags else {}


def score_run(rd: RunDir, ood: list[str], *, root: Path | None = None, download: bool = False,
              limit: int | None = None, train_limit: int | None = 2000, batch_size: int = 256,
              device: str = "auto", seed: int = 0, notify=print,
              progress: ScoreProgress | None = None,
              options: dict[str, object] | None = None,
              detectors: list[str] | None = None, members: list[Path] = (),
              held_out: bool = False,
              transforms: list[str] | tuple[str, ...] = ()) -> list[SetSummary]:
    """``ood-audit score`` as a library call: writes ``rd.scores`` and returns summaries.

    ``options`` are the model's scoring options (``{"iw_samples": 64}`` for a VAE).
    ``detectors``: the detectors whose inputs to write and whose ``score_<name>`` columns
    readers add (None: every one whose inputs can be had); ``members``: other runs forming
    an ensemble with this one (WAIC, ensemble; an ensemble folder's members come first);
    ``held_out``: train rows from after the model's training ``--limit``. See
    :mod:`ood_audit.scoring.detect`. ``transforms``: tags (``grayscale``,
    ``contrast=0.5``, ``invert``) each scoring a transformed copy of the in-distribution
    test set and every OOD set (:func:`build_jobs`).

    Under torchrun (``WORLD_SIZE`` > 1) every process scores its share of each set
    (:class:`Shard`) into ``scores/part-<rank>.parquet``; only the main process reports
    progress and returns summaries (the others return []).
    """
    from ..distributed import dist_env, init_distributed
    from .detect import plan

    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    parse_transforms(list(transforms))  # a bad --transform fails before the model loads
    # under torchrun the rank picks its GPU (cuda:LOCAL_RANK); alone, --device is checked as usual
    ctx = init_distributed(device if dist_env()[1] > 1 else pick_device(device))
    dev = ctx.device
    if not ctx.is_main:
        notify, progress = (lambda m: None), None
    model, info = load_checkpoint(rd.model, dev)
    for name, value in (options or {}).items():
        model.set_score_option(name, value)
    jobs = build_jobs(info, ood, root=root, download=download, limit=limit,
                      train_limit=train_limit, seed=seed, notify=notify, held_out=held_out,
                      transforms=transforms)
    terms, extras = model_columns(model, dev)
    all_members = [*rd.ensemble_members()[1:], *members]
    chosen = plan(rd, model, info, jobs, detectors=detectors, members=all_members,
                  terms=terms, extra_columns=extras, device=dev, held_out=held_out)
    summaries = score_jobs(model, info, jobs, rd.scores, batch_size=batch_size, device=dev,
                           seed=seed, progress=progress, plan=chosen, ctx=ctx)
    if ctx.is_main:
        with contextlib.suppress(FileNotFoundError):
            rd.legacy_scores.unlink()  # superseded by scores/; readers would prefer it anyway
        save_pixel_maps(model, jobs, rd.pixel_maps, dev, seed)
    return summaries
