"""``ood-audit report``: HTML / Markdown / JSON report of one or more runs, and CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import ReportConfig
from ..errors import GateFailed
from . import render
from .options import FormatOpt, GateOpt, RunsArg, default

OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Folder to write into. Default: <first run>/report.", show_default=False)]
JunitOpt = Annotated[Path | None, typer.Option(
    "--junit", help="Also write a JUnit XML file with one testcase per gate.", show_default=False)]
BootOpt = Annotated[int, typer.Option(
    "--n-boot", help="Bootstrap resamples for the 95% intervals (0: no intervals).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resampling.")]


def report(
    runs: RunsArg = None, out_dir: OutOpt = None,
    fmt: FormatOpt = default(ReportConfig, "formats"), gate: GateOpt = None,
    junit: JunitOpt = None, n_boot: BootOpt = default(ReportConfig, "n_boot"),
    seed: SeedOpt = default(ReportConfig, "seed"),
) -> None:
    """Write report.html (self-contained), report.md and summary.json for one or more runs:
    bits/dim histograms, ROC curves, AUROC / AUPR / FPR@95TPR with bootstrap intervals per
    detector and OOD set, the log p(x) decomposition and the training curve.

    With $GITHUB_STEP_SUMMARY set, the Markdown summary is appended there too.
    """
    cfg = ReportConfig(formats=fmt, gates=list(gate or []), n_boot=n_boot, seed=seed,
                       junit=None if junit is None else str(junit))
    from ..commands.report import report  # the library: pandas, matplotlib, for the work

    result = report(runs, cfg, out=out_dir, notify=render.note)
    render.reported(result)
    if not result.passed:
        raise GateFailed(f"{len(result.failed)} of {len(result.gates)} gate(s) failed: "
                         + "; ".join(r.detail for r in result.failed))
