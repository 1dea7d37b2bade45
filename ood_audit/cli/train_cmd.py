"""``ood-audit train``: fit a density model on a data set into a run directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..config import RunConfig, from_dict
from ..training.run import load_run_config, train_run
from ..training.trainer import EpochResult, TrainProgress
from .console import err, note
from .console import out as stdout
from .options import DATA_HELP, DataRootOpt, DeviceOpt, DownloadOpt, MODEL_HELP


class RichTrainProgress(TrainProgress):
    """A progress bar per epoch on a terminal; one line per epoch otherwise."""

    def __init__(self) -> None:
        self.live = err.is_terminal
        self.bar: Progress | None = None
        self.task = None

    def epoch_start(self, epoch, epochs, n_batches, start_batch):
        if not self.live:
            return
        self.bar = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[bpd]} bits/dim  {task.fields[rate]} img/s"),
            TimeRemainingColumn(), console=err, transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=n_batches, completed=start_batch,
                                      bpd="-", rate="-")

    def batch(self, batch, train_bpd, images_per_s):
        if self.bar is not None:
            self.bar.update(self.task, completed=batch, bpd=f"{train_bpd:.3f}",
                            rate=f"{images_per_s:.0f}")

    def epoch_end(self, result: EpochResult):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        err.print(
            f"epoch {result.epoch}: train {result.train_bpd:.3f} bits/dim, test "
            f"{result.test_bpd:.3f} bits/dim, {result.images_per_s:.0f} img/s, "
            f"{result.seconds:.0f} s" + (f", {result.nan_skips} skipped steps"
                                         if result.nan_skips else ""),
            highlight=False,
        )

    def stop(self):
        if self.bar is not None:
            self.bar.stop()


def train(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: glow."),
    data: str = typer.Option(None, "--data", "-d", help=DATA_HELP + " Default: fashionmnist."),
    preset: str = typer.Option(
        None, "--preset", help="Size preset: tiny (tests), small (CPU demo), paper "
        "(L=3, K=32, 512 hidden; a GPU). Default: small."),
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML file with model, preset, data, model_config and "
        "train keys (see examples/demo.yaml); flags given here override it."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory. Default: "
                             "runs/<model>-<data>-<time>."),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the training set."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (Adam, linear warm-up)."),
    seed: int = typer.Option(None, "--seed", help="Seed of init, data order and noise."),
    limit: int = typer.Option(None, "--limit", help="Train on the first N images only."),
    keep_checkpoints: str = typer.Option(
        None, "--keep-checkpoints", help="Per-epoch checkpoints kept for decompose "
        "--over-training: all, last or every:N. Default: all."),
    device: str = DeviceOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its "
                                "last saved state (after Ctrl-C or a crash)."),
    data_root: Path = DataRootOpt,
    download: bool = DownloadOpt,
) -> None:
    """Train a model. Writes model.safetensors each epoch (atomically), a per-epoch
    metrics table, and points runs/latest at the run for score/decompose/report.

    Example: ood-audit train --model glow --data fashionmnist --epochs 2 --limit 10000
    """
    cfg = load_run_config(config) if config else RunConfig()
    for key, value in (("model", model), ("data", data), ("preset", preset)):
        if value is not None:
            setattr(cfg, key, value)
    overrides = {k: v for k, v in dict(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, limit=limit,
        keep_checkpoints=keep_checkpoints, device=device).items() if v is not None}
    if overrides:
        import dataclasses

        merged = {**dataclasses.asdict(cfg.train), **overrides}
        cfg.train = from_dict(type(cfg.train), merged, where="train options")
    progress = RichTrainProgress()
    try:
        outcome = train_run(cfg, out, resume=resume, resume_epochs=epochs, data_root=data_root,
                            download=download, log=note, progress=progress)
    finally:
        progress.stop()
    last = outcome.results[-1] if outcome.results else None
    cfg = outcome.config
    stdout.print(f"[bold]trained[/] {cfg.model} on {cfg.data} ({outcome.n_params:,} parameters, "
              f"{outcome.device}) -> {outcome.run_dir}", highlight=False)
    if last:
        stdout.print(f"test bits/dim {last.test_bpd:.3f} after epoch {last.epoch}; next: "
                  f"ood-audit score --run {outcome.run_dir} --ood mnist", highlight=False)
