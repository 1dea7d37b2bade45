"""Writing the scores table: a streaming Parquet writer, the folder published whole,
and the per-set summaries read back without loading the table.

The table is written into a temporary folder next to ``RUN/scores`` and renamed over it
once every process has written its part, so readers see the old table or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..distributed import DistContext
from ..faults import writing
from ..interrupts import sigint_deferred
from ..runs import ensure_dir, replace_dir
from .parquet import scores_files, set_order
from .schema import SET_COLUMNS, ScoresMeta

ROW_GROUP = 8192
#: Columns worth dictionary-encoding (few distinct values). Float columns are not: their
#: per-row-group hash tables cost memory and time and fall back to plain encoding anyway.
DICTIONARY_COLUMNS = [*SET_COLUMNS, "label", "n_dims"]


@dataclass
class SetSummary:
    dataset: str
    role: str
    split: str
    transform: str
    n: int
    means: dict[str, float] = field(default_factory=dict)
    log_px: np.ndarray = field(default_factory=lambda: np.zeros(0))


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


SUMMARY_ROWS = 16384  # rows read at a time by summarize: its memory does not grow with the table


class SetTotals:
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
    columns = list(dict.fromkeys([*SET_COLUMNS, "index", "log_px", *keys]))
    totals: dict[tuple[str, ...], SetTotals] = {}
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
                totals.setdefault(tuple(str(v) for v in key), SetTotals(keys)).add(rows)
    order = set_order(meta)  # as the readers order sets (schema.canonical_order): unknown ones last
    ranked = sorted(totals, key=lambda k: order.index(k) if k in order else len(order))
    return [totals[k].summary(k) for k in ranked]


def folder_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None when absent: tells whether a folder was replaced."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino
