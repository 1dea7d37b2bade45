"""What :func:`ood_audit.audit` returns: the scored run directory, read the way the CLI's
commands read it.

Every property and method calls the library function of the matching command on the run
directory (``report.build.analyse_run`` for the metrics, ``commands.decompose``,
``commands.report``), so a notebook sees the numbers ``ood-audit report`` prints.
"""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path

import pandas as pd

from ..analysis.tables import load_run_scores
from ..commands.decompose import decompose
from ..commands.report import report
from ..config import DecomposeConfig, ReportConfig
from ..data.images import ImageSet
from ..data.registry import in_memory_sets
from ..errors import UserError
from ..report.build import ReportResult, analyse_run, run_names
from ..runs import RunDir
from ..scoring.schema import ScoresMeta
from ..scoring.writer import SetSummary


class AuditResult:
    """The outcome of one audit.

    - ``run``: the run directory holding ``scores/`` (and, once asked for,
      ``decomposition.parquet``). A temporary one (``audit`` on a module without ``out=``)
      is deleted by :meth:`close`, when this object is garbage-collected, or when Python
      exits; pass ``out=DIR`` to ``audit`` to keep it.
    - ``sets``: per scored set, the means ``ood-audit score`` prints (``SetSummary``).
    - ``scores``: the scores table, one row per image, the Parquet columns of
      docs/scores-schema.md plus a ``score_<detector>`` column per detector scored.
    - ``metrics``: the report's metrics table, one row per detector and OOD set: AUROC,
      AUPR-In, AUPR-Out, FPR@95TPR with bootstrap 95% intervals (1000 resamples, seed 0),
      mean bits/dim, verdict, best detector per set.
    """

    def __init__(self, run: RunDir, sets: list[SetSummary], *, held: dict[str, ImageSet],
                 temporary: bool):
        self.run: Path = run.root
        self.sets = sets
        self.temporary = temporary
        self._rd, self._held = run, held
        self._table: tuple[pd.DataFrame, ScoresMeta] | None = None
        self._metrics: pd.DataFrame | None = None
        self._cleanup = (weakref.finalize(self, shutil.rmtree, str(run.root), True)
                         if temporary else None)

    def __repr__(self) -> str:
        where = "temporary" if self.temporary else "kept"
        sets = ", ".join(f"{s.dataset}[{s.role}/{s.split}]" for s in self.sets)
        return f"AuditResult(run={str(self.run)!r} ({where}), sets: {sets})"

    @property
    def scores(self) -> pd.DataFrame:
        return self._read()[0]

    @property
    def meta(self) -> ScoresMeta:
        """The scores' metadata (model, training set, term names, ...)."""
        return self._read()[1]

    @property
    def metrics(self) -> pd.DataFrame:
        if self._metrics is None:
            self._metrics = self.metrics_table()
        return self._metrics

    def metrics_table(self, *, n_boot: int = ReportConfig.n_boot,
                      seed: int = ReportConfig.seed) -> pd.DataFrame:
        """:attr:`metrics` with another number of bootstrap resamples or seed."""
        ReportConfig(n_boot=n_boot, seed=seed)  # checks them as the CLI does
        section = analyse_run(self._rd, run_names([self._rd])[0], n_boot=n_boot, seed=seed).section
        return pd.DataFrame(section["metrics"])

    def decomposition(self, **options) -> pd.DataFrame:
        """``ood-audit decompose`` on the run: the tidy table of ``decomposition.parquet``
        (one row per set and term: mean, std, difference from the in-distribution test
        set, share of the gap), written into the run. ``df.attrs["gaps"]`` holds the
        sentences naming the term that carries each OOD set's gap.

        ``options``: the fields of ``DecomposeConfig`` (``over_training=True``,
        ``second_order=True``, ...; these two need a run directory with a checkpoint).
        """
        cfg = _config(DecomposeConfig, options, "decomposition")
        if (cfg.over_training or cfg.second_order) and not self._rd.model.exists():
            raise UserError("over_training and second_order rescore the model from its "
                            f"checkpoint, and {self.run} holds none (a module audited from "
                            "memory): audit a run directory for these")
        with in_memory_sets(self._held):
            result = decompose(self._rd, cfg)
        table = result.table.copy()
        table.attrs["gaps"] = [g.sentence() for g in result.gaps]
        return table

    def report(self, path: str | Path, *, formats: str = "html,md,json",
               gates: list[str] | tuple[str, ...] = (), n_boot: int = ReportConfig.n_boot,
               seed: int = ReportConfig.seed, junit: str | None = None) -> ReportResult:
        """``ood-audit report`` into the folder ``path``: ``report.html``, ``report.md``
        (+ ``figures/``), ``summary.json``. ``gates`` as ``--gate``
        (``"mnist:auroc>=0.9"``); a failed gate does not raise: see ``.passed`` and
        ``.failed`` of the result."""
        cfg = ReportConfig(formats=formats, gates=list(gates), n_boot=n_boot, seed=seed,
                           junit=junit)
        return report([self._rd], cfg, out=Path(path))

    def close(self) -> None:
        """Delete a temporary run directory now (a kept one is left alone)."""
        if self._cleanup is not None:
            self._cleanup()

    def _read(self) -> tuple[pd.DataFrame, ScoresMeta]:
        if self._table is None:
            self._table = load_run_scores(self._rd)
        return self._table


def _config(cls, options: dict, where: str):
    try:
        return cls(**options)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from None
