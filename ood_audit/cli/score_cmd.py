"""``ood-audit score``: per-image likelihood terms of in-distribution and OOD sets."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..analysis.tables import set_label
from ..data.transforms import TRANSFORMS
from ..distributed import dist_env, init_distributed
from ..runs import resolve_run, run_lock
from ..scoring.jobs import ScoreJob
from ..scoring.scorer import ScoreProgress, score_run
from ..scoring.writer import SetSummary, folder_identity
from .console import err, note
from .console import out as stdout
from .options import (
    DETECTOR_HELP,
    OOD_HELP,
    Bf16Opt,
    ChannelsLastOpt,
    CompileOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    RunOpt,
    Tf32Opt,
    fast_path_options,
)


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


HEADERS = {"log_pz": "log p(z)", "logdet": "log|det|"}
TRANSFORM_HELP = (
    "Also score a transformed copy of the in-distribution test set and of every --ood set "
    "(uint8 pixels, after the shape adaptation, before dequantization), tagged in the "
    "Parquet's transform column; repeat for several. The untransformed sets are always "
    "scored. " + "; ".join(f"{s.usage}: {s.summary}" for s in TRANSFORMS.values()) + "."
)


def summary_table(summaries: list[SetSummary]) -> Table:
    """Per set: mean bits/dim, log p(x), the model's terms (log p(z) and log|det| for a
    flow), and the AUROC of log p(x) with in-distribution as the positive class."""
    from sklearn.metrics import roc_auc_score

    in_test = next(s for s in summaries if s.role == "in" and s.split == "test")
    terms = [k for k in summaries[0].means if k not in ("bpd", "log_px")]
    table = Table(title="scores (means per image, nats)")
    for col in ("data set", "role", "split", "n", "bits/dim", "log p(x)",
                *(HEADERS.get(t, t) for t in terms), "AUROC"):
        table.add_column(col, justify="left" if col in ("data set", "role", "split") else "right")
    for s in summaries:
        auroc = ""
        if s.role == "ood":
            labels = np.r_[np.ones(len(in_test.log_px)), np.zeros(len(s.log_px))]
            value = roc_auc_score(labels, np.r_[in_test.log_px, s.log_px])
            auroc = f"{value:.3f}" + (" (prefers OOD)" if value < 0.5 else "")
        # escape: "mnist[invert]" is a set label, not Rich markup
        table.add_row(escape(set_label(s.dataset, s.transform)), s.role, s.split, str(s.n),
                      f"{s.means['bpd']:.3f}",
                      *(f"{s.means[k]:.1f}" for k in ("log_px", *terms)), auroc)
    return table


def detector_table(rd) -> Table:
    """AUROC of every detector the scores hold, per OOD set (in-distribution test positive)."""
    from ..analysis import tables
    from ..analysis.detectors import detector_scores
    from ..analysis.metrics import ood_metrics

    df, meta = tables.load_run_scores(rd)
    ref = tables.reference_rows(df)
    sets = tables.ood_sets(df)
    scores = detector_scores(df, meta)
    table = Table(title="detectors: AUROC (in-distribution positive; best in bold)")
    table.add_column("detector")
    for oset in sets:
        table.add_column(escape(oset.label), justify="right")
    values = {}
    for name, s in scores.items():
        for oset in sets:
            a, b = s.loc[ref.index].to_numpy(float), s.loc[oset.rows.index].to_numpy(float)
            a, b = a[~np.isnan(a)], b[~np.isnan(b)]
            values[name, oset.label] = (ood_metrics(a, b, n_boot=0)["auroc"]
                                        if a.size and b.size else float("nan"))
    best = {o.label: max((values[n, o.label] for n in scores), default=float("nan"))
            for o in sets}
    for name in scores:
        cells = []
        for oset in sets:
            v = values[name, oset.label]
            cell = f"{v:.3f}"
            cells.append(f"[bold]{cell}[/]" if v == best[oset.label] and len(scores) > 1
                         else cell)
        table.add_row(name, *cells)
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
    iw_samples: int = typer.Option(
        None, "--iw-samples", help="VAE only: importance samples K of the IWAE bound "
        "log p(x) >= E[log 1/K sum_k p(x,z_k)/q(z_k|x)] (more = tighter, slower)."),
    detector: list[str] = typer.Option(
        None, "--detector", help="A detector to add as a score_<name> column; repeat for "
        "several. Default: every one whose needs are met. " + DETECTOR_HELP),
    member: list[Path] = typer.Option(
        None, "--member", help="Another run trained on the same data: with this run it forms "
        "the ensemble of the waic and ensemble detectors (this run is member 0); repeat for "
        "more. An ensemble folder (--run DIR written by train --seeds) brings its own."),
    held_out: bool = typer.Option(
        False, "--held-out", help="Take the in-distribution train rows (the typicality "
        "detector's entropy estimate) from train images the model never saw: those after "
        "its training --limit N. Default: the first --train-limit train images."),
    transform: list[str] = typer.Option(None, "--transform", metavar="NAME[=ARG]",
                                        help=TRANSFORM_HELP),
    workers: int = typer.Option(
        None, "--workers", min=0, help="DataLoader worker processes that dequantize the next "
        "images while the model scores (pinned memory on CUDA). Default: 2 on CUDA, 0 on CPU, "
        "where workers would compete with the forward pass for cores. The scores do not "
        "depend on it (the noise is seeded per chunk of 1,024 images)."),
    device: str = DeviceOpt,
    data_root: Path = DataRootOpt,
    download: bool = DownloadOpt,
    channels_last: bool = ChannelsLastOpt,
    compile: bool = CompileOpt,
    bf16: bool = Bf16Opt,
    tf32: bool = Tf32Opt,
) -> None:
    """Score the in-distribution test split and each --ood set with the run's checkpoint.

    Writes RUN/scores/part-0.parquet: one row per image, one column per likelihood term
    (log p(z) per level, log|det| per level and layer kind), log_px and bits/dim, and
    the inputs of each detector (background log p(x) with RUN/background, members'
    log p(x) and the ensemble's with --member, PNG length); readers add the detector
    scores. --run on an ensemble folder (train --seeds) scores every member.

    Sharded: torchrun --nproc_per_node N -m ood_audit score ... splits every set across
    N processes, each writing RUN/scores/part-<rank>.parquet; the numbers are the same.

    Example: ood-audit score --ood mnist --ood noise-uniform --limit 2000
    Variance sweep: ood-audit score --ood svhn --transform contrast=0.5 --transform grayscale

    Ctrl-C stops with exit code 130; RUN/scores keeps its previous table (a partial one is
    never published).
    """
    from ..errors import Interrupted, UserError

    if not ood:
        raise UserError("name at least one OOD set with --ood (e.g. --ood mnist)")
    for name, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    if train_limit is not None and train_limit < 0:
        raise UserError(f"--train-limit must be zero or positive, got {train_limit}")
    options: dict[str, object] = {}
    if iw_samples is not None:
        if iw_samples <= 0:
            raise UserError(f"--iw-samples must be positive, got {iw_samples}")
        options["iw_samples"] = iw_samples
    options.update(fast_path_options(channels_last=channels_last, compile=compile, bf16=bf16,
                                     tf32=tf32))
    rd = resolve_run(run)
    ctx = init_distributed(device or "auto") if dist_env()[1] > 1 else None
    is_main = ctx is None or ctx.is_main
    progress = RichScoreProgress() if is_main else None
    before = folder_identity(rd.scores)
    try:
        # under torchrun only rank 0 holds the run's lock: the ranks write one table together
        with (run_lock(rd, "ood-audit score") if is_main else contextlib.nullcontext()), \
                (progress.bar if progress else contextlib.nullcontext()):
            summaries = score_run(rd, list(ood), root=data_root, download=download, limit=limit,
                                  train_limit=train_limit, batch_size=batch_size,
                                  device=device or "auto", seed=seed, notify=note,
                                  progress=progress, options=options,
                                  detectors=list(dict.fromkeys(detector)) if detector else None,
                                  members=list(member or []), held_out=held_out,
                                  transforms=list(transform or []), workers=workers)
    except KeyboardInterrupt:
        # The folder is swapped in whole (scorer.scores_folder), so it is either the old
        # table or, when Ctrl-C came just as it was published, the complete new one.
        kept = ("was left as it was" if folder_identity(rd.scores) == before
                else "holds the complete new table (the summary was not printed)")
        raise Interrupted(f"scoring stopped; {rd.scores} {kept}: a partial table is never "
                          "published") from None
    finally:
        if ctx is not None:
            ctx.close()
    if not is_main:
        return
    stdout.print(summary_table(summaries))
    stdout.print(detector_table(rd))
    stdout.print(f"wrote {rd.scores} ({sum(s.n for s in summaries):,} rows); next: "
                 f"ood-audit decompose --run {rd.root}", highlight=False)
