"""``ood-audit decompose`` as one library call: which term of log p(x) carries each OOD
set's likelihood gap, and optionally the same over training and the paper's
second-order prediction of the gap."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..analysis import decomposition as dec
from ..analysis.over_training import over_training
from ..analysis.second_order import SecondOrderProgress, second_order_run
from ..analysis.tables import load_run_scores
from ..config import DecomposeConfig
from ..report.build import jsonable
from ..runs import RunDir, resolve_run, run_lock
from ..scoring.scorer import ScoreProgress


@dataclass
class DecomposeResult:
    """The decomposition table (tidy, one row per set and term), where it was written,
    the gap of each OOD set with its carrier, and the optional analyses."""

    run: RunDir
    model: str
    in_dataset: str
    table: pd.DataFrame
    path: Path
    gaps: list[dec.Gap]
    over_training: pd.DataFrame | None = None  # tidy: epoch, dataset, term, mean
    second_order: dict | None = None  # second_order.json's content
    notes: list[str] = field(default_factory=list)

    @property
    def records(self) -> list[dict]:
        """The table as JSON-ready rows (NaN as None), as the report keeps it."""
        return jsonable(self.table.to_dict(orient="records"))

    @property
    def reference(self) -> str:
        """The label of the in-distribution test set every gap is measured from."""
        return next(r["label"] for r in self.records
                    if r["role"] == "in" and r["split"] == "test" and r["transform"] == "none")


def decompose(run: Path | RunDir | None, cfg: DecomposeConfig, *, data_root: Path | None = None,
              download: bool = False, progress: ScoreProgress | None = None,
              second_order_progress: SecondOrderProgress | None = None) -> DecomposeResult:
    """Decompose the run's scores (``run`` None: the last run trained) into
    ``decomposition.parquet`` (or ``.csv``), under the run's lock; with
    ``cfg.over_training`` also rescore each OOD set's first images with every epoch
    checkpoint (``progress``), with ``cfg.second_order`` predict each gap from
    second-order statistics (``second_order_progress``)."""
    rd = run if isinstance(run, RunDir) else resolve_run(run, need_model=False)
    with run_lock(rd, "ood-audit decompose"):  # never interleave with a train or score
        df, meta = load_run_scores(rd)
        table = dec.decompose(df, meta)
        path = dec.write_decomposition(
            table, rd.root / ("decomposition.csv" if cfg.csv else "decomposition.parquet"))
        result = DecomposeResult(rd, meta.model, meta.in_dataset, table, path, dec.gaps(table))
        ood = [str(d) for d in df.loc[(df["role"] == "ood") & (df["transform"] == "none"),
                                      "dataset"].unique()]
        if not result.gaps:
            result.notes.append("no OOD set in the scores: run ood-audit score --ood mnist to "
                                "compare one")
        if cfg.over_training:
            result.over_training = over_training(
                rd, ood, limit=cfg.over_training_limit, root=data_root, download=download,
                device=cfg.device, progress=progress)
        if cfg.second_order and not ood:
            result.notes.append("--second-order needs an OOD set in the scores: run ood-audit "
                                "score --ood mnist")
        elif cfg.second_order:
            result.second_order = second_order_run(
                rd, ood, limit=cfg.second_order_limit, root=data_root, download=download,
                batch_size=cfg.second_order_batch, device=cfg.device, seed=meta.dequant_seed,
                center=cfg.second_order_center, progress=second_order_progress)
    return result
