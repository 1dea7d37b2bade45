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
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import __version__
from ..data import ImageSet, adapt_to_shape, bits_per_dim, dequantize, load_dataset
from ..data.transforms import describe, parse_transforms
from ..distributed import DistContext
from ..errors import UserError
from ..faults import keeping, writing
from ..models.base import DensityModel, sum_terms
from ..runs import RunDir, ensure_dir, replace_dir
from ..training.checkpoint import CheckpointInfo, load_checkpoint
from ..training.trainer import pick_device, seeded
from .batch_fit import ForwardSize
from .pixel_maps import save_pixel_maps
from .schema import SCHEMA_VERSION, SET_COLUMNS, SETS_KEY, ScoresMeta, arrow_schema, part_name, totals_for

NOISE_CHUNK = 1024  # images dequantized together; fixes the noise independent of batching
# Rows buffered before a Parquet row group is written. The writer's memory is one row
# group's columns plus their encoding buffers: 16,384 rows cost ~14 MB more RSS than
# this (with float dictionaries on), which is what a 100k-image score grew by.
ROW_GROUP = 8192
#: Columns worth dictionary-encoding (few distinct values). Float columns are not: their
#: per-row-group hash tables cost memory and time and fall back to plain encoding anyway.
DICTIONARY_COLUMNS = [*SET_COLUMNS, "label", "n_dims"]


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
                 seed: int, *, shard: Shard = Shard(), plan=None,
                 workers: int | None = None,
                 fit: ForwardSize | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield column dicts (numpy, one entry per image) for batches of ``job``'s images.

    ``plan`` (a :class:`~ood_audit.scoring.detect.DetectorPlan`): also score its
    companion models on the same x and add its data features, batch by batch.
    ``workers``: DataLoader processes dequantizing the next chunks
    (:func:`~ood_audit.scoring.loader.dequantized_batches`; None: 2 on CUDA, 0 on CPU);
    the numbers do not depend on it. ``fit``: the forward-pass size, shared by a
    command's sets, halved on CUDA out-of-memory (:mod:`.batch_fit`; None: a fresh one).
    """
    from .loader import dequantized_batches

    fit = fit or ForwardSize(batch_size)
    images = job.images.images
    seeded_chunk = None
    for c, start, x in dequantized_batches(images, shard.chunks(len(images)),
                                           batch_size=batch_size, seed=seed, key=job.key,
                                           device=device, workers=workers):
        if c != seeded_chunk:
            # Models that sample while scoring (a VAE's IWAE bound) draw from the global
            # RNG: seed it per chunk (apart from the noise's stream) so a rerun, or a run
            # with another number of processes or workers, gives the same numbers.
            torch.manual_seed(seeded(seed, job.key, c, 1).initial_seed())
            seeded_chunk = c
        yield fit.run(lambda xs, first: _batch_columns(model, job, xs, first, plan), x, start)


def _batch_columns(model: DensityModel, job: ScoreJob, x: torch.Tensor, start: int,
                   plan=None) -> dict[str, np.ndarray]:
    """The columns of images ``start ..`` of ``job`` (``x``: them, dequantized)."""
    from .detect import batch_columns

    # Sum in float64 so the written terms add up to the written log_px exactly.
    raw_terms, extras = model.score_columns(x)
    terms = {k: v.double() for k, v in raw_terms.items()}
    log_px = sum_terms(terms)
    cols: dict[str, np.ndarray] = {
        "log_px": log_px.cpu().numpy(),
        "bpd": bits_per_dim(log_px, math.prod(job.images.shape)).cpu().numpy(),
    }
    for name, value in {**terms, **extras}.items():
        cols[name] = value.double().cpu().numpy()
    idx = np.arange(start, start + len(x), dtype=np.int64)
    cols["index"] = idx + job.first_index
    cols["label"] = job.images.labels[idx].numpy()
    if plan is not None:
        batch_columns(plan, cols, x, job.images.images[start:start + len(x)])
    return cols


class ScoresWriter:
    """Streams column batches into one Parquet file, a row group at a time: at most
    ``row_group`` rows (plus one batch) are held before they go to disk, whatever the
    size of the set."""

    def __init__(self, path: Path, schema: pa.Schema, row_group: int | None = None,
                 shown: Path | None = None):
        self.schema = schema
        self.shown = Path(shown or path)  # what a fault's line names (not the temporary folder)
        with writing(self.shown, existed=False):
            self.writer = pq.ParquetWriter(str(path), schema, use_dictionary=[
                c for c in DICTIONARY_COLUMNS if c in schema.names])
        self.buffer: list[pa.RecordBatch] = []
        self.rows = 0
        self.row_group = row_group or ROW_GROUP  # read at call time (tests lower it)

    def write(self, columns: dict[str, np.ndarray | list]) -> None:
        batch = pa.RecordBatch.from_pydict(columns, schema=self.schema)
        self.buffer.append(batch)
        self.rows += batch.num_rows
        if self.rows >= self.row_group:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            with writing(self.shown, existed=False):
                self.writer.write_table(pa.Table.from_batches(self.buffer, self.schema))
            self.buffer, self.rows = [], 0

    def close(self) -> None:
        self.flush()
        with writing(self.shown, existed=False):
            self.writer.close()

    def abort(self) -> None:
        """Close after a failure, quietly: the file is thrown away, and writing the rest
        (pyarrow: "Operation on closed file" after a full disk) would hide why it failed."""
        self.buffer = []
        with contextlib.suppress(Exception):
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
    # Means shown on screen: a flow's group totals, else the model's terms.
    keys = ["bpd", "log_px", *(groups or terms)]
    tallies: list[tuple[tuple[str, ...], _SetTotals]] = []
    fit = ForwardSize(batch_size, notify)
    model.eval()
    with scores_folder(out, ctx) as tmp:
        writer = ScoresWriter(tmp / part_name(ctx.rank), schema, shown=out / part_name(ctx.rank))
        try:
            for job in jobs:
                n_dims = math.prod(job.images.shape)
                progress.set_start(job, shard.size(len(job.images)))
                tally = _SetTotals(keys, shard.size(len(job.images)))
                tallies.append((tuple(_set_key(job)), tally))
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


def _set_key(job: ScoreJob) -> list[str]:
    return [job.images.name, job.role, job.images.split, job.transform]


@contextlib.contextmanager
def scores_folder(out: Path, ctx: DistContext) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out`` shared by every process; once all
    of them have written their part, the main process renames it over ``out``.

    A failure leaves ``out`` as it was (the temporary folder is removed by the main
    process when it fails, or by the next successful run). Under torchrun the ranks
    agree (:meth:`DistContext.agree`) where they used to wait for each other: when one
    fails (its disk is full, its GPU memory runs out) every rank stops with its line,
    and nothing is published.
    """
    out = Path(out)
    name = ctx.broadcast_object(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}" if ctx.is_main else None)
    tmp = out.parent / name
    failure: Exception | None = None
    try:
        if ctx.is_main:
            try:
                ensure_dir(out.parent)
                for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run
                    shutil.rmtree(stale, ignore_errors=True)
                with writing(out, existed=out.exists()):
                    tmp.mkdir()
            except Exception as exc:  # noqa: BLE001 - every rank learns of it below
                failure = exc
        ctx.agree(failure)  # the folder exists before anyone writes into it
        try:
            yield tmp
        except Exception as exc:  # noqa: BLE001 - every rank learns of it below
            failure = exc
        ctx.agree(failure)  # every part is closed, or every rank stops
        if ctx.is_main:
            try:
                with sigint_deferred():  # a Ctrl-C between replace_dir's two renames would lose both
                    replace_dir(tmp, out)
            except Exception as exc:  # noqa: BLE001 - every rank learns of it below
                failure = exc
        ctx.agree(failure)  # the table is in place before anyone reads it
    finally:
        if ctx.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) until the block is done; it is raised right after.

    A Python-level handler that only records the signal, not a blocked signal mask: the
    kernel hands a process's signal to any thread that does not block it (torch's and
    arrow's pools), and Python runs handlers in the main thread whichever got it. Processes
    forked inside the block inherit the recording handler, so a Ctrl-C there is ignored
    too. Outside the main thread (no signal handlers there), a plain block.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if received:
            signal.raise_signal(signal.SIGINT)  # now, to the handler that was in place


SUMMARY_ROWS = 16384  # rows read at a time by summarize: its memory does not grow with the table


class _SetTotals:
    """One set's running sums of ``keys`` and its log_px and index columns (for the
    AUROC), in arrays allocated once when the set's size is known (``size``), else
    grown by doubling: nothing else of the rows is kept."""

    def __init__(self, keys: list[str], size: int = 0):
        self.keys = keys
        self.sums = dict.fromkeys(keys, 0.0)
        self.counts = dict.fromkeys(keys, 0)  # non-NaN values, as pandas' mean counts
        self.n = 0
        self.log_px = np.empty(size, np.float64)
        self.index = np.empty(size, np.int64)

    def add(self, cols) -> None:
        """Rows given as columns (numpy arrays, or a DataFrame's columns)."""
        b = len(cols["log_px"])
        for k in self.keys:
            v = np.asarray(cols[k], dtype=np.float64)
            self.sums[k] += float(np.nansum(v))
            self.counts[k] += int(np.count_nonzero(~np.isnan(v)))
        if self.n + b > len(self.log_px):
            grown = max(self.n + b, 2 * len(self.log_px))
            self.log_px = np.resize(self.log_px, grown)
            self.index = np.resize(self.index, grown)
        self.log_px[self.n:self.n + b] = cols["log_px"]
        self.index[self.n:self.n + b] = cols["index"]
        self.n += b

    def summary(self, key: tuple[str, ...]) -> SetSummary:
        index, log_px = self.index[:self.n], self.log_px[:self.n]
        if self.n > 1 and (np.diff(index) < 0).any():  # parts of a sharded table: image order
            log_px = log_px[np.argsort(index, kind="stable")]
        means = {k: self.sums[k] / self.counts[k] if self.counts[k] else float("nan")
                 for k in self.keys}
        if len(log_px) < len(self.log_px):  # not a view pinning the unused tail
            log_px = log_px.copy()
        return SetSummary(*key, n=self.n, means=means, log_px=log_px)


def summarize(path: Path, keys: list[str]) -> list[SetSummary]:
    """Per-set means of ``keys`` and the log_px of each set (in image order), sets in
    scoring order, read from the finished table (every part: a sharded run's main
    process learns the other ranks' rows this way; one process sums as it writes).

    Streams: only the set columns, ``index``, ``log_px`` and ``keys`` are read,
    :data:`SUMMARY_ROWS` rows at a time, into running sums; what grows with the table is
    the log_px column kept for the AUROC (8 bytes per image), never the table.
    """
    from .schema import scores_files, set_order

    columns = list(dict.fromkeys([*SET_COLUMNS, "index", "log_px", *keys]))
    totals: dict[tuple[str, ...], _SetTotals] = {}
    meta = None
    for part in scores_files(path):
        # dictionary-encoded strings: categoricals, not one Python str per row.
        # pre_buffer off: it fetches the columns of every row group up front (the whole
        # file's worth); threads off: arrow's decoding threads kept adding RSS with every
        # row group read (10k rows +12 MB, 100k +34 MB; flat single-threaded).
        pf = pq.ParquetFile(part, read_dictionary=SET_COLUMNS, pre_buffer=False)
        meta = meta or ScoresMeta.from_arrow(pf.schema_arrow.metadata, part)
        for batch in pf.iter_batches(batch_size=SUMMARY_ROWS, columns=columns, use_threads=False):
            df = batch.to_pandas(use_threads=False)
            for key, rows in df.groupby(SET_COLUMNS, sort=False, observed=True):
                totals.setdefault(tuple(str(v) for v in key), _SetTotals(keys)).add(rows)
    order = set_order(meta)  # as the readers order sets (schema.canonical_order): unknown ones last
    ranked = sorted(totals, key=lambda k: order.index(k) if k in order else len(order))
    return [totals[k].summary(k) for k in ranked]


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
    from ..distributed import dist_env, init_distributed
    from .detect import plan
    from .loader import check_workers

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


def folder_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None when absent: tells whether a folder was replaced."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _scores_kept(out: Path, before: tuple[int, int] | None) -> str:
    """What a failed ``score`` left in ``out``: the folder is swapped in whole, so the
    previous table, or (a failure after publishing) the complete new one."""
    now = folder_identity(out)
    if now == before:
        return f"previous scores kept ({out} as it was)" if before else "no scores written"
    if now is None:
        return f"{out} is gone (removed while scoring?)"
    return f"the new scores in {out} are complete"
