"""``ood-audit report`` as one library call: the report of one or more runs, its CI gates,
the JUnit file and the GitHub job summary."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ReportConfig, parse_formats
from ..errors import UserError
from ..report.build import ReportResult, append_step_summary, build_report
from ..report.gates import parse_gates, write_junit
from ..runs import RunDir, resolve_run


def report(runs: list[Path | RunDir] | None, cfg: ReportConfig, *, out: Path | None = None,
           notify=print) -> ReportResult:
    """Write the report of ``runs`` (None or []: the last run trained) into ``out``
    (default: the first run's ``report/``), the JUnit file of ``cfg.junit``, and append the
    Markdown summary to ``$GITHUB_STEP_SUMMARY`` when it is set. Gates are checked
    before anything is written; a failed gate is in the result (``passed``), the caller
    decides the exit code."""
    formats = parse_formats(cfg.formats)
    gates = parse_gates(cfg.gates)  # a malformed gate fails before any work
    rds = [r if isinstance(r, RunDir) else resolve_run(r, need_model=False)
           for r in (runs or [None])]
    if not rds:
        raise UserError("no run to report on: pass one or more run directories")
    result = build_report(rds, out if out is not None else rds[0].report, formats, gates,
                          n_boot=cfg.n_boot, seed=cfg.seed)
    if cfg.junit is not None:
        result.files["junit"] = write_junit(Path(cfg.junit), result.gates)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        try:
            append_step_summary(Path(summary_file), result.step_summary)
        except OSError as exc:
            notify(f"could not append to GITHUB_STEP_SUMMARY ({exc.strerror or exc})")
    return result
