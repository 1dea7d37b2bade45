"""The per-sample scores table: its columns, metadata, and the reader every command uses.

One row per (data set, transform, image). Fixed columns come first, then ``log_px`` and
``bpd``, then the model's own named terms (whose sum is ``log_px``), then group totals
derived from them (``log_pz``, ``logdet`` for flows), then extra columns (a model's own
extras; a background model's and ensemble members' ``log_px``; data features such as
``png_bits``), then detector scores (``score_<detector>``). The names of the model's terms are stored in the schema
metadata (``ood_audit.terms``) so readers never guess which columns add up.

``score`` writes the table as a folder ``RUN/scores/`` of ``part-<rank>.parquet`` files,
one per process (``part-0.parquet`` alone without torchrun); older runs hold a single
``scores.parquet`` file. :func:`read_scores` reads either as one table, with its rows in
one deterministic order (sets as scored, then image index), so a table scored by W
processes equals the one scored by one, row for row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError

#: Bumped when a column's meaning changes; readers refuse other versions.
SCHEMA_VERSION = "1"

FIXED_COLUMNS: dict[str, pa.DataType] = {
    "dataset": pa.string(),    # registry name or user path
    "role": pa.string(),       # "in" (the training distribution) or "ood"
    "split": pa.string(),      # "train" | "test"
    "transform": pa.string(),  # "none" or e.g. "grayscale", "contrast=0.5"
    "index": pa.int64(),       # position of the image in its data set
    "label": pa.int64(),       # class label, -1 when unknown
    "n_dims": pa.int64(),      # D = C*H*W counted by bits/dim
    "log_px": pa.float64(),    # log p(x) in nats (continuous density on [0,1)^D)
    "bpd": pa.float64(),       # bits per dimension, ood_audit.data.preprocess.bits_per_dim
}

#: Group totals: column -> prefix of the model terms it sums. A model writes a total only
#: when it has terms with that prefix.
TERM_GROUPS: dict[str, str] = {"log_pz": "log_pz_level", "logdet": "logdet_level"}

META_PREFIX = "ood_audit."

#: Columns the detectors of :mod:`ood_audit.analysis.detectors` read besides the model's
#: terms, written by ``ood-audit score`` as extra columns (listed in ``extra_columns``):
#: log p(x) of the run's background model (``RUN/background``), in nats, same x;
BACKGROUND_COLUMN = "log_px_background"
#: log p(x) of ensemble member i >= 1 (``score --member RUN``; member 0 is ``log_px``).
MEMBER_PREFIX = "log_px_member"
#: and its group totals, ``log_pz_member{i}``, ``logdet_member{i}`` (when it has levels);
MEMBER_TOTAL_PREFIXES = {"log_pz": "log_pz_member", "logdet": "logdet_member"}
#: log p(x) of the ensemble: log mean_j p_j(x) over the M members, float64 (member 0 = the run).
ENSEMBLE_COLUMN = "log_px_ensemble"
#: ScoresMeta.extra key: JSON list of [dataset, role, split, transform], the sets in the
#: order they were scored (the readers' row order).
SETS_KEY = "sets"
#: The columns that name a scored set; a table's rows group into sets by these.
SET_COLUMNS = ["dataset", "role", "split", "transform"]
# Data features (no model) have one column per entry of ood_audit.scoring.features.FEATURES.


@dataclass
class ScoresMeta:
    """What the schema metadata records about how the scores were produced."""

    version: str
    schema_version: str
    model: str
    in_dataset: str
    terms: list[str]
    run_config: dict
    checkpoint_sha256: str
    dequant_seed: int
    adaptations: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    #: per-image columns a model writes outside the sum (e.g. a per-row log-lik summary)
    extra_columns: list[str] = field(default_factory=list)

    def to_arrow(self) -> dict[bytes, bytes]:
        plain = {
            "version": self.version,
            "schema_version": self.schema_version,
            "model": self.model,
            "in_dataset": self.in_dataset,
            "terms": json.dumps(self.terms),
            "run_config": json.dumps(self.run_config),
            "checkpoint_sha256": self.checkpoint_sha256,
            "dequant_seed": str(self.dequant_seed),
            "adaptations": json.dumps(self.adaptations),
            "extra": json.dumps(self.extra),
            "extra_columns": json.dumps(self.extra_columns),
        }
        return {(META_PREFIX + k).encode(): v.encode() for k, v in plain.items()}

    @classmethod
    def from_arrow(cls, meta: dict[bytes, bytes] | None, path: Path) -> ScoresMeta:
        meta = meta or {}
        plain = {
            k.decode()[len(META_PREFIX):]: v.decode()
            for k, v in meta.items()
            if k.decode(errors="replace").startswith(META_PREFIX)
        }
        if "schema_version" not in plain:
            raise UserError(f"{path} was not written by ood-audit score (no ood_audit metadata)")
        if plain["schema_version"] != SCHEMA_VERSION:
            raise UserError(
                f"{path} has scores schema version {plain['schema_version']}, this ood-audit "
                f"reads version {SCHEMA_VERSION}: rescore with ood-audit score"
            )
        try:
            return cls(
                version=plain["version"],
                schema_version=plain["schema_version"],
                model=plain["model"],
                in_dataset=plain["in_dataset"],
                terms=json.loads(plain["terms"]),
                run_config=json.loads(plain["run_config"]),
                checkpoint_sha256=plain["checkpoint_sha256"],
                dequant_seed=int(plain["dequant_seed"]),
                adaptations=json.loads(plain.get("adaptations", "{}")),
                extra=json.loads(plain.get("extra", "{}")),
                extra_columns=json.loads(plain.get("extra_columns", "[]")),
            )
        except (KeyError, ValueError) as exc:
            raise UserError(f"{path}: damaged ood_audit metadata ({exc}); rescore") from None


def arrow_schema(terms: list[str], totals: list[str], scores: list[str], meta: ScoresMeta) -> pa.Schema:
    """The Arrow schema of a scores table for a model with the given term columns."""
    fields = [pa.field(name, dtype) for name, dtype in FIXED_COLUMNS.items()]
    fields += [pa.field(name, pa.float64()) for name in [*terms, *totals, *scores]]
    return pa.schema(fields, metadata=meta.to_arrow())


def totals_for(terms: list[str]) -> dict[str, list[str]]:
    """Group totals a model's terms give: {"log_pz": [...], "logdet": [...]}, non-empty only."""
    out = {}
    for total, prefix in TERM_GROUPS.items():
        members = [t for t in terms if t.startswith(prefix)]
        if members:
            out[total] = members
    return out


def part_name(rank: int) -> str:
    """File name of process ``rank``'s share of the scores folder."""
    return f"part-{rank}.parquet"


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
