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

import dataclasses
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import __version__
from ..data import ImageSet, adapt_to_shape, bits_per_dim, dequantize, load_dataset
from ..data.transforms import describe, parse_transforms
from ..errors import UserError
from ..models.base import DensityModel, sum_terms
from ..runs import RunDir, atomic_path
from ..training.checkpoint import CheckpointInfo, load_checkpoint
from ..training.trainer import pick_device, seeded
from .pixel_maps import save_pixel_maps
from .schema import SCHEMA_VERSION, ScoresMeta, arrow_schema, totals_for

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


def dequantized_chunks(images: torch.Tensor, seed: int, key: int) -> Iterator[torch.Tensor]:
    """Yield float chunks of ``images`` dequantized with per-chunk seeded noise."""
    for c, start in enumerate(range(0, len(images), NOISE_CHUNK)):
        yield dequantize(images[start:start + NOISE_CHUNK], seeded(seed, key, c))


@torch.inference_mode()
def score_images(model: DensityModel, job: ScoreJob, batch_size: int, device: torch.device,
                 seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield column dicts (numpy, one entry per image) for batches of ``job``'s images."""
    n_dims = math.prod(job.images.shape)
    offset = 0
    # Models that sample while scoring (a VAE's IWAE bound) draw from the global RNG:
    # seed it per set so a rerun gives the same numbers.
    torch.manual_seed(seeded(seed, job.key).initial_seed())
    for chunk in dequantized_chunks(job.images.images, seed, job.key):
        for start in range(0, len(chunk), batch_size):
            x = chunk[start:start + batch_size].to(device, non_blocking=True)
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
            idx = np.arange(offset + start, offset + start + len(x), dtype=np.int64)
            cols["index"] = idx + job.first_index
            cols["label"] = job.images.labels[idx].numpy()
            yield cols
        offset += len(chunk)


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
               progress: ScoreProgress | None = None) -> list[SetSummary]:
    """Score every job into ``out`` (written atomically) and return per-set summaries."""
    import time

    progress = progress or ScoreProgress()
    terms, extras = model_columns(model, device)
    groups = totals_for(terms)
    meta = ScoresMeta(
        version=__version__, schema_version=SCHEMA_VERSION, model=info.model,
        in_dataset=info.dataset, terms=terms, run_config=info.run_config,
        checkpoint_sha256=info.sha256, dequant_seed=seed,
        adaptations={j.images.name: j.images.adaptation for j in jobs if j.images.adaptation},
        extra={"epoch": str(info.epoch), "device": str(device),
               **{f"model.{k}": v for k, v in model.extra_metadata().items()},
               **_transforms_meta(jobs)},
        extra_columns=extras,
    )
    schema = arrow_schema(terms, [*groups, *extras], [], meta)
    summaries = []
    model.eval()
    with atomic_path(out) as tmp:
        writer = ScoresWriter(tmp, schema)
        try:
            for job in jobs:
                n = len(job.images)
                n_dims = math.prod(job.images.shape)
                progress.set_start(job, n)
                sums: dict[str, float] = {}
                log_px_parts = []
                t0 = time.perf_counter()
                for cols in score_images(model, job, batch_size, device, seed):
                    for total, members in groups.items():
                        cols[total] = np.sum([cols[m] for m in members], axis=0)
                    b = len(cols["log_px"])
                    cols.update(dataset=[job.images.name] * b, role=[job.role] * b,
                                split=[job.images.split] * b, transform=[job.transform] * b,
                                n_dims=np.full(b, n_dims, dtype=np.int64))
                    writer.write(cols)
                    # Means shown on screen: a flow's group totals, else the model's terms.
                    for k in ("bpd", "log_px", *(groups or terms)):
                        sums[k] = sums.get(k, 0.0) + float(np.sum(cols[k]))
                    log_px_parts.append(cols["log_px"])
                    progress.advance(b, b / max(time.perf_counter() - t0, 1e-9))
                    t0 = time.perf_counter()
                summaries.append(SetSummary(
                    dataset=job.images.name, role=job.role, split=job.images.split,
                    transform=job.transform, n=n, means={k: v / n for k, v in sums.items()},
                    log_px=np.concatenate(log_px_parts),
                ))
        finally:
            writer.close()
    return summaries


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
    ``detectors``: the detectors to add as ``score_<name>`` columns (None: every one
    whose inputs can be had); ``members``: other runs forming an ensemble with this one
    (WAIC); ``held_out``: train rows from after the model's training ``--limit``. See
    :mod:`ood_audit.scoring.detect`. ``transforms``: tags (``grayscale``,
    ``contrast=0.5``, ``invert``) each scoring a transformed copy of the in-distribution
    test set and every OOD set (:func:`build_jobs`).
    """
    from .detect import add_detectors, plan

    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    parse_transforms(list(transforms))  # a bad --transform fails before the model loads
    dev = pick_device(device)
    model, info = load_checkpoint(rd.model, dev)
    for name, value in (options or {}).items():
        model.set_score_option(name, value)
    jobs = build_jobs(info, ood, root=root, download=download, limit=limit,
                      train_limit=train_limit, seed=seed, notify=notify, held_out=held_out,
                      transforms=transforms)
    terms, extras = model_columns(model, dev)
    chosen = plan(rd, model, info, jobs, detectors=detectors, members=list(members),
                  terms=terms, extra_columns=extras, device=dev, held_out=held_out)
    summaries = score_jobs(model, info, jobs, rd.scores, batch_size=batch_size, device=dev,
                           seed=seed, progress=progress)
    add_detectors(rd.scores, chosen, jobs, batch_size=batch_size, device=dev, seed=seed,
                  progress=progress)
    save_pixel_maps(model, jobs, rd.pixel_maps, dev, seed)
    return summaries
