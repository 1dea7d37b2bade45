"""The per-sample scores table: its columns, metadata, and the reader every command uses.

One row per (data set, transform, image). Fixed columns come first, then ``log_px`` and
``bpd``, then the model's own named terms (whose sum is ``log_px``), then group totals
derived from them (``log_pz``, ``logdet`` for flows), then extra columns (a model's own
extras; a background model's and ensemble members' ``log_px``; data features such as
``png_bits``), then detector scores (``score_<detector>``). The names of the model's terms are stored in the schema
metadata (``ood_audit.terms``) so readers never guess which columns add up.

This module is the table's vocabulary (column names, metadata keys, :class:`ScoresMeta`)
and imports nothing heavy; :mod:`.parquet` writes the Arrow schema and reads tables.

``score`` writes the table as a folder ``RUN/scores/`` of ``part-<rank>.parquet`` files,
one per process (``part-0.parquet`` alone without torchrun); older runs hold a single
``scores.parquet`` file. :func:`read_scores` reads either as one table, with its rows in
one deterministic order (sets as scored, then image index), so a table scored by W
processes equals the one scored by one, row for row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

#: Bumped when a column's meaning changes; readers refuse other versions.
SCHEMA_VERSION = "1"

#: The columns every table starts with, and their Arrow types (by name).
FIXED_COLUMNS: dict[str, str] = {
    "dataset": "string",    # registry name or user path
    "role": "string",       # "in" (the training distribution) or "ood"
    "split": "string",      # "train" | "test"
    "transform": "string",  # "none" or e.g. "grayscale", "contrast=0.5"
    "index": "int64",       # position of the image in its data set
    "label": "int64",       # class label, -1 when unknown
    "n_dims": "int64",      # D = C*H*W counted by bits/dim
    "log_px": "float64",    # log p(x) in nats (continuous density on [0,1)^D)
    "bpd": "float64",       # bits per dimension, ood_audit.data.preprocess.bits_per_dim
}

#: Group totals: column -> prefix of the model terms it sums. A model writes a total only
#: when it has terms with that prefix.
TERM_GROUPS: dict[str, str] = {"log_pz": "log_pz_level", "logdet": "logdet_level"}
#: Further members of a group: the per-transform log-dets ``logdet_t{i}_{kind}`` of flows
#: built with other libraries (:mod:`ood_audit.models.adapters`), so they total ``logdet``.
GROUP_PATTERNS: dict[str, re.Pattern[str]] = {"logdet": re.compile(r"logdet_t\d+_")}

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
#: Prefix of the detector score columns, ``score_<detector>``.
SCORE_PREFIX = "score_"
# Data features (no model) have one column per entry of ood_audit.scoring.features.FEATURES.

# ScoresMeta.extra keys: what the metadata records beyond its fixed fields.
#: The checkpoint's epoch, the device scored on, the number of processes that scored.
EPOCH_KEY, DEVICE_KEY, PROCESSES_KEY = "epoch", "device", "processes"
#: JSON list of the detectors ``score`` chose (read-time ``score_<name>`` columns).
DETECTORS_KEY = "detectors"
#: JSON list of the dimensions each level of a multi-scale flow factors out (sum D).
LEVEL_DIMS_KEY = "level_dims"
#: JSON {detector: {name: value}}: what detectors fitted on the in-distribution train
#: rows when the table was read (typicality's entropy estimate), set at read time.
FITTED_KEY = "fitted"
#: The typicality detector's entropy estimate in nats, set at read time.
ENTROPY_KEY = "typicality_entropy_nats"
#: JSON {tag: what it does} of the transforms scored.
TRANSFORMS_KEY = "transforms"
#: Which train images the in-distribution train rows are (first ones, or held out).
TRAIN_ROWS_KEY = "train_rows"
#: JSON of the background model's path, sha256, epoch, model, mu and weight decay.
BACKGROUND_KEY = "background"
#: ``member{i}``: JSON of ensemble member i's path, sha256, epoch and model.
MEMBER_KEY_PREFIX = "member"
#: Number of models in the ensemble (member 0 is the run).
ENSEMBLE_SIZE_KEY = "ensemble_size"


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


def totals_for(terms: list[str]) -> dict[str, list[str]]:
    """Group totals a model's terms give: {"log_pz": [...], "logdet": [...]}, non-empty only."""
    out = {}
    for total, prefix in TERM_GROUPS.items():
        pattern = GROUP_PATTERNS.get(total)
        members = [t for t in terms
                   if t.startswith(prefix) or (pattern is not None and pattern.match(t))]
        if members:
            out[total] = members
    return out


#: How the report and the console spell a column.
PRETTY = {"log_px": "log p(x)", "log_pz": "log p(z)", "logdet": "log|det|", "bpd": "bits/dim"}


def pretty(column: str) -> str:
    return PRETTY.get(column, column)


def part_name(rank: int) -> str:
    """File name of process ``rank``'s share of the scores folder."""
    return f"part-{rank}.parquet"
