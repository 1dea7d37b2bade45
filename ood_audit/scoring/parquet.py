"""The scores table on disk: its Arrow schema, and the reader every command uses.

:func:`read_scores` reads a ``scores/`` folder of ``part-<rank>.parquet`` files, or an
older run's single ``scores.parquet``, as one table, with its rows in one deterministic
order (sets as scored, then image index), so a table scored by W processes equals the
one scored by one, row for row. The columns and metadata are described in
:mod:`.schema`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from .schema import FIXED_COLUMNS, SET_COLUMNS, SETS_KEY, ScoresMeta


def arrow_schema(terms: list[str], totals: list[str], scores: list[str], meta: ScoresMeta) -> pa.Schema:
    """The Arrow schema of a scores table for a model with the given term columns."""
    fields = [pa.field(name, getattr(pa, dtype)()) for name, dtype in FIXED_COLUMNS.items()]
    fields += [pa.field(name, pa.float64()) for name in [*terms, *totals, *scores]]
    return pa.schema(fields, metadata=meta.to_arrow())


def scores_files(path: Path) -> list[Path]:
    """The Parquet file(s) behind a scores table: the file, or a folder's part-*.parquet."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("part-*.parquet"),
                       key=lambda p: (len(p.name), p.name))  # part-2 before part-10
        if not parts:
            raise UserError(f"{path} holds no part-*.parquet files: run ood-audit score")
        return parts
    if not path.exists():
        raise UserError(f"no scores at {path}: run ood-audit score first")
    return [path]


def read_scores(path: Path) -> tuple[pd.DataFrame, ScoresMeta]:
    """Read a scores table (file or sharded folder) and check it is complete.

    Raises UserError for a truncated or foreign file, another schema version, or
    missing columns: one line naming the file and the problem.
    """
    frames = []
    meta = None
    for part in scores_files(path):
        try:
            table = pq.read_table(part)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{part} is not a readable Parquet file ({_first_line(exc)}); rescore") from None
        part_meta = ScoresMeta.from_arrow(table.schema.metadata, part)
        meta = meta or part_meta
        frames.append(table.to_pandas())
    assert meta is not None
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df = canonical_order(df, meta)
    missing = [c for c in [*FIXED_COLUMNS, *meta.terms] if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; rescore with ood-audit score")
    if df.empty:
        raise UserError(f"{path} holds no rows; rescore with ood-audit score")
    return df, meta


def set_order(meta: ScoresMeta | None) -> list[tuple[str, ...]]:
    """The sets in scoring order, from the metadata's ``sets`` list ([] when a table
    predates it, or the entry is damaged: readers then keep order of first appearance)."""
    if meta is None:
        return []
    try:
        return [tuple(s) for s in json.loads(meta.extra.get(SETS_KEY, "[]"))]
    except (ValueError, TypeError):
        return []


def canonical_order(df: pd.DataFrame, meta: ScoresMeta) -> pd.DataFrame:
    """Rows sorted by (set in scoring order, image index), index reset.

    The set order is the metadata's ``sets`` list; tables written before it existed keep
    their sets in order of first appearance. The sort is stable and a no-op on a table
    already in that order (a single-process one).
    """
    if df.empty or "index" not in df.columns:
        return df
    order = set_order(meta)
    # group ids in order of first appearance; only the few group keys become tuples
    grouped = df.groupby(SET_COLUMNS, sort=False, observed=True)
    ids = grouped.ngroup().to_numpy()
    present = [tuple(str(v) for v in k) for k in grouped.size().index]
    seen = list(dict.fromkeys([*order, *present]))  # unknown sets after known ones
    rank = np.array([seen.index(k) for k in present], dtype=np.int64)[ids]
    perm = np.lexsort((df["index"].to_numpy(), rank))
    if (perm == np.arange(len(perm))).all():
        return df.reset_index(drop=True)
    return df.iloc[perm].reset_index(drop=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
