"""``ood-audit score``: per-image likelihood terms of in-distribution and OOD sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..runs import resolve_run, run_lock
from ..scoring.scorer import ScoreJob, ScoreProgress, SetSummary, score_run
from .console import err, note
from .console import out as stdout
from .options import DataRootOpt, DeviceOpt, DownloadOpt, OOD_HELP, RunOpt


class RichScoreProgress(ScoreProgress):
    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(),
            console=err, transient=True, disable=not err.is_terminal,
        )
        self.task = None

    def set_start(self, job: ScoreJob, n_images: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, visible=False)
        self.task = self.bar.add_task(f"{job.images.name} ({job.images.split})", total=n_images,
                                      rate="-")

    def advance(self, n_images: int, images_per_s: float) -> None:
        self.bar.update(self.task, advance=n_images, rate=f"{images_per_s:.0f}")


def summary_table(summaries: list[SetSummary]) -> Table:
    """Per set: mean bits/dim, log p(z), log|det|, and AUROC of log p(x) (in = positive)."""
    from sklearn.metrics import roc_auc_score

    in_test = next(s for s in summaries if s.role == "in" and s.split == "test")
    table = Table(title="scores (means per image)")
    for col in ("data set", "role", "split", "n", "bits/dim", "log p(x)", "log p(z)",
                "log|det|", "AUROC"):
        table.add_column(col, justify="left" if col in ("data set", "role", "split") else "right")
    for s in summaries:
        auroc = ""
        if s.role == "ood":
            labels = np.r_[np.ones(len(in_test.log_px)), np.zeros(len(s.log_px))]
            value = roc_auc_score(labels, np.r_[in_test.log_px, s.log_px])
            auroc = f"{value:.3f}" + (" (prefers OOD)" if value < 0.5 else "")
        fmt = lambda k: f"{s.means[k]:.1f}" if k in s.means else "-"  # noqa: E731
        table.add_row(s.dataset, s.role, s.split, str(s.n), f"{s.means['bpd']:.3f}",
                      fmt("log_px"), fmt("log_pz"), fmt("logdet"), auroc)
    return table


def score(
    ood: list[str] = typer.Option(None, "--ood", help=OOD_HELP),
    run: Path = RunOpt,
    limit: int = typer.Option(None, "--limit", help="Score the first N images of each set."),
    train_limit: int = typer.Option(
        2000, "--train-limit", help="In-distribution TRAIN images scored too (for the "
        "paper's train/test/OOD histogram); 0 to skip."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dequantization noise."),
    device: str = DeviceOpt,
    data_root: Path = DataRootOpt,
    download: bool = DownloadOpt,
) -> None:
    """Score the in-distribution test split and each --ood set with the run's checkpoint.

    Writes RUN/scores.parquet: one row per image, one column per likelihood term
    (log p(z) per level, log|det| per level and layer kind), log_px and bits/dim.

    Example: ood-audit score --ood mnist --ood noise-uniform --limit 2000
    """
    from ..errors import UserError

    if not ood:
        raise UserError("name at least one OOD set with --ood (e.g. --ood mnist)")
    for name, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    if train_limit is not None and train_limit < 0:
        raise UserError(f"--train-limit must be zero or positive, got {train_limit}")
    rd = resolve_run(run)
    progress = RichScoreProgress()
    with run_lock(rd, "ood-audit score"), progress.bar:
        summaries = score_run(rd, list(ood), root=data_root, download=download, limit=limit,
                              train_limit=train_limit, batch_size=batch_size,
                              device=device or "auto", seed=seed, notify=note,
                              progress=progress)
    stdout.print(summary_table(summaries))
    stdout.print(f"wrote {rd.scores} ({sum(s.n for s in summaries):,} rows); next: "
                 f"ood-audit decompose --run {rd.root}", highlight=False)
