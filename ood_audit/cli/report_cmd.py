"""``ood-audit report``: HTML / Markdown / JSON report of one or more runs, and CI gates."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..errors import GateFailed, UserError
from ..report.build import FORMAT_FILES, append_step_summary, build_report, parse_formats
from ..report.gates import GATE_METRICS, parse_gates, write_junit
from ..report.render import gate_table, metric_table
from ..runs import resolve_run
from .console import note, out
from .decompose_cmd import rich_table

GATE_HELP = (
    "A CI gate DATASET[:DETECTOR]:METRIC OP BOUND, e.g. 'mnist:auroc>=0.9' or "
    "'mnist:likelihood:fpr95<0.2'; repeat for several. OP: >= <= > <. METRIC: "
    f"{', '.join(m for m in GATE_METRICS if '_ci_' not in m)}, or a metric's interval "
    "bound (auroc_ci_low, ...). Exit 1 when one fails (the report is still written)."
)


def report(
    runs: list[Path] | None = typer.Argument(
        None, help="Run directories, shown side by side. Default: the last run trained "
        "(runs/latest).", show_default=False),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Folder to write into. Default: <first run>/report."),
    fmt: str = typer.Option(
        "html,md,json", "--format",
        help="Comma-separated outputs: "
        + ", ".join(f"{k} ({v})" for k, v in FORMAT_FILES.items()) + "."),
    gate: list[str] | None = typer.Option(None, "--gate", help=GATE_HELP, show_default=False),
    junit: Path | None = typer.Option(
        None, "--junit", help="Also write a JUnit XML file with one testcase per gate."),
    n_boot: int = typer.Option(
        1000, "--n-boot", help="Bootstrap resamples for the 95% intervals (0: no intervals)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
) -> None:
    """Write report.html (self-contained), report.md and summary.json for one or more runs:
    bits/dim histograms, ROC curves, AUROC / AUPR / FPR@95TPR with bootstrap intervals per
    detector and OOD set, the log p(x) decomposition and the training curve.

    With $GITHUB_STEP_SUMMARY set, the Markdown summary is appended there too.
    """
    formats = parse_formats(fmt)
    gates = parse_gates(gate)  # a malformed gate fails before any work
    if n_boot < 0:
        raise UserError(f"--n-boot must be 0 or more, got {n_boot}")
    if seed < 0:  # numpy's SeedSequence takes non-negative integers only
        raise UserError(f"--seed must be 0 or more, got {seed}")
    rds = [resolve_run(r, need_model=False) for r in runs] if runs else [
        resolve_run(None, need_model=False)]
    target = out_dir if out_dir is not None else rds[0].report
    result = build_report(rds, target, formats, gates, n_boot=n_boot, seed=seed)
    if junit is not None:
        write_junit(junit, result.gates)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        try:
            append_step_summary(Path(summary_file), result.step_summary)
        except OSError as exc:
            note(f"could not append to GITHUB_STEP_SUMMARY ({exc.strerror or exc})")
    out.print(rich_table(metric_table(result.rows, with_run=len(rds) > 1, compact=True),
                         "OOD detection (in-distribution positive; higher score = more in)"))
    if result.gates:
        out.print(rich_table(gate_table(result.summary["gates"]), "CI gates"))
    written = [str(p) for p in result.files.values()] + ([str(junit)] if junit else [])
    out.print("wrote " + ", ".join(written), highlight=False)
    if not result.passed:
        failed = result.failed
        raise GateFailed(f"{len(failed)} of {len(result.gates)} gate(s) failed: "
                         + "; ".join(r.detail for r in failed))
