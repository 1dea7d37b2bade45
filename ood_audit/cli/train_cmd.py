"""``ood-audit train``: fit a density model on a data set into a run directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..config import RunConfig, from_dict
from ..distributed import dist_env
from ..errors import UserError
from ..runs import resolve_run
from ..training.background import DEFAULT_MU, DEFAULT_WEIGHT_DECAY, background_dir, train_background
from ..training.ensemble import ENSEMBLE_FILE, member_name, parse_seeds, train_ensemble
from ..training.run import load_run_config, train_run
from ..training.trainer import EpochResult, TrainProgress
from .console import err, note
from .console import out as stdout
from .options import (
    DATA_HELP,
    MODEL_HELP,
    Bf16Opt,
    ChannelsLastOpt,
    CompileOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    Tf32Opt,
    fast_path_options,
)


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
            TextColumn("{task.fields[bpd]} bits/dim  {task.fields[rate]} img/s  "
                       "{task.fields[clipped]} clipped"),
            TimeRemainingColumn(), console=err, transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=n_batches, completed=start_batch,
                                      bpd="-", rate="-", clipped="-")

    def batch(self, batch, train_bpd, images_per_s, clipped_frac=0.0):
        if self.bar is not None:
            self.bar.update(self.task, completed=batch, bpd=f"{train_bpd:.3f}",
                            rate=f"{images_per_s:.0f}", clipped=f"{clipped_frac:.0%}")

    def epoch_end(self, result: EpochResult):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        err.print(
            f"epoch {result.epoch}: train {result.train_bpd:.3f} bits/dim, test "
            f"{result.test_bpd:.3f} bits/dim, {result.images_per_s:.0f} img/s, "
            f"{result.seconds:.0f} s, {result.clipped_frac:.0%} of steps clipped"
            + (f", {result.nan_skips} skipped steps" if result.nan_skips else ""),
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
    batch_size: int = typer.Option(
        None, "--batch-size", help="Images per step: the GLOBAL batch. Under torchrun each of "
        "N ranks trains on batch/N of it (N must divide it), so a run with N ranks follows "
        "the trajectory of one process with the same --batch-size."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (Adam, linear warm-up)."),
    seed: int = typer.Option(None, "--seed", help="Seed of init, data order and noise."),
    seeds: str = typer.Option(
        None, "--seeds", help="An ensemble: one run per seed, e.g. --seeds 0,1,2,3,4, trained "
        "one after another into OUT/seed-<s> (each equal to a train --seed s run), listed in "
        "OUT/ensemble.json as they finish. --resume --out OUT continues the unfinished ones."),
    limit: int = typer.Option(None, "--limit", help="Train on the first N images only."),
    keep_checkpoints: str = typer.Option(
        None, "--keep-checkpoints", help="Per-epoch checkpoints kept for decompose "
        "--over-training: all, last or every:N. Default: all."),
    weight_decay: float = typer.Option(
        None, "--weight-decay", help="L2 weight decay (Adam's coupled decay). Default: 0, "
        f"or {DEFAULT_WEIGHT_DECAY:g} with --background."),
    device: str = DeviceOpt,
    channels_last: bool = ChannelsLastOpt,
    compile: bool = CompileOpt,
    bf16: bool = Bf16Opt,
    tf32: bool = Tf32Opt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its "
                                "last saved state (after Ctrl-C or a crash)."),
    background: bool = typer.Option(
        False, "--background", help="Train the background model of the likelihood-ratio "
        "detector (Ren et al. 2019) for an existing run (--run, default runs/latest) into "
        "RUN/background: same model, preset and data, inputs perturbed with rate --mu, L2 "
        "--weight-decay. Other train flags override the run's for the background."),
    mu: float = typer.Option(
        None, "--mu", help=f"With --background: probability that a training pixel is "
        f"replaced by a uniform random value in 0..255. Default: {DEFAULT_MU:g}."),
    run: Path = typer.Option(
        None, "--run", help="With --background: the run to add a background model to. "
        "Default: the last run trained (runs/latest); --out DIR names it too."),
    data_root: Path = DataRootOpt,
    download: bool = DownloadOpt,
) -> None:
    """Train a model. Writes model.safetensors each epoch (atomically), a per-epoch
    metrics table, and points runs/latest at the run for score/decompose/report.

    Example: ood-audit train --model glow --data fashionmnist --epochs 2 --limit 10000

    Background model for the likelihood ratio: ood-audit train --background --run RUN

    Ensemble of 5 seeds: ood-audit train --seeds 0,1,2,3,4 --out runs/ens

    Data-parallel (DDP; rank 0 writes): torchrun --nproc_per_node 2 -m ood_audit train ...

    Glow fast paths (--channels-last, --compile, --bf16, --tf32) are kept in the run's
    config.yaml (train.fast_path), so --resume trains on with the same ones.
    """
    if dist_env()[0] != 0:  # under torchrun rank 0 speaks for the run
        stdout.quiet = err.quiet = True
    if seeds is not None and background:
        raise UserError("--seeds cannot be combined with --background: train the ensemble, "
                        "then a background model per member with --background --run OUT/seed-<s>")
    if background:
        _train_background(run=run, out=out, mu=mu, weight_decay=weight_decay, resume=resume,
                          named={"--model": model, "--data": data, "--preset": preset,
                                 "--config": config},
                          overrides=dict(epochs=epochs, batch_size=batch_size, lr=lr,
                                         seed=seed, limit=limit, device=device,
                                         keep_checkpoints=keep_checkpoints),
                          data_root=data_root, download=download)
        return
    if seeds is not None and seed is not None:
        raise UserError("--seeds and --seed conflict: --seeds 0,1,2 trains one run per seed, "
                        "--seed S one run")
    for flag, value in (("--mu", mu), ("--run", run)):
        if value is not None:
            raise UserError(f"{flag} applies to --background only (the likelihood-ratio "
                            "background model); --out names the run directory")
    cfg = load_run_config(config) if config else RunConfig()
    for key, value in (("model", model), ("data", data), ("preset", preset)):
        if value is not None:
            setattr(cfg, key, value)
    overrides = {k: v for k, v in dict(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, limit=limit,
        keep_checkpoints=keep_checkpoints, device=device,
        weight_decay=weight_decay).items() if v is not None}
    fast = list(fast_path_options(channels_last=channels_last, compile=compile, bf16=bf16, tf32=tf32))
    if fast:  # added to the config file's fast_path, if any
        overrides["fast_path"] = [*cfg.train.fast_path, *fast]
    if overrides:
        import dataclasses

        merged = {**dataclasses.asdict(cfg.train), **overrides}
        cfg.train = from_dict(type(cfg.train), merged, where="train options")
    if seeds is not None or (resume and out is not None and (Path(out) / ENSEMBLE_FILE).exists()):
        _train_seeds(cfg, out, parse_seeds(seeds) if seeds is not None else None, resume=resume,
                     epochs=epochs, data_root=data_root, download=download)
        return
    progress = RichTrainProgress()
    try:
        outcome = _ranks_agree(lambda: train_run(
            cfg, out, resume=resume, resume_epochs=epochs, data_root=data_root,
            download=download, log=note, progress=progress))
    finally:
        progress.stop()
    last = outcome.results[-1] if outcome.results else None
    cfg = outcome.config
    stdout.print(f"[bold]trained[/] {cfg.model} on {cfg.data} ({outcome.n_params:,} parameters, "
              f"{outcome.device}) -> {outcome.run_dir}", highlight=False)
    if last:
        stdout.print(f"test bits/dim {last.test_bpd:.3f} after epoch {last.epoch}; next: "
                  f"ood-audit score --run {outcome.run_dir} --ood mnist", highlight=False)


def _ranks_agree(call):
    """``call()``; under torchrun a UserError ends ranks other than 0 silently with exit
    code 2 (every rank raises the same one, rank 0 prints it)."""
    try:
        return call()
    except UserError as exc:
        if dist_env()[0] != 0:
            raise typer.Exit(exc.exit_code) from None
        raise


def _train_seeds(cfg: RunConfig, out: Path | None, seeds: list[int] | None, *, resume: bool,
                 epochs: int | None, data_root: Path | None, download: bool) -> None:
    """``train --seeds``: one member per seed, one after another (see training/ensemble.py)."""
    progress = RichTrainProgress()

    def done(outcome) -> None:
        last = outcome.results[-1] if outcome.results else None
        stdout.print(f"[bold]trained[/] member {outcome.run_dir.name} (seed "
                     f"{outcome.config.train.seed}) -> {outcome.run_dir}"
                     + (f", test bits/dim {last.test_bpd:.3f}" if last else ""), highlight=False)

    try:
        outcomes = _ranks_agree(lambda: train_ensemble(
            None if resume else cfg, out, seeds, resume=resume, resume_epochs=epochs,
            data_root=data_root, download=download, log=note, progress=progress, on_member=done))
    finally:
        progress.stop()
    root = outcomes[0].run_dir.parent
    names = [member_name(o.config.train.seed) for o in outcomes]
    # score --run on the ensemble folder scores every member and their log-mean-exp.
    stdout.print(f"[bold]ensemble[/] of {len(names)} -> {root / ENSEMBLE_FILE}; next: ood-audit "
                 f"score --run {root} --ood mnist", highlight=False)


def _train_background(*, run: Path | None, out: Path | None, mu: float | None,
                      weight_decay: float | None, resume: bool, named: dict,
                      overrides: dict, data_root: Path | None, download: bool) -> None:
    """``train --background``: the likelihood-ratio background model of an existing run."""
    given = [flag for flag, value in named.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} cannot be combined with --background: the "
                        "background model uses the run's own model, preset and data")
    if run is not None and out is not None and Path(run).resolve() != Path(out).resolve():
        raise UserError("--run and --out name different runs; with --background give the "
                        "run to add a background model to once (--run DIR)")
    rd = resolve_run(run if run is not None else out)
    progress = RichTrainProgress()
    try:
        outcome = train_background(
            rd, mu=DEFAULT_MU if mu is None else mu,
            weight_decay=DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay,
            overrides={k: v for k, v in overrides.items() if v is not None},
            resume=resume, resume_epochs=overrides.get("epochs"), data_root=data_root,
            download=download, log=note, progress=progress)
    finally:
        progress.stop()
    bg = background_dir(rd)
    last = outcome.results[-1] if outcome.results else None
    stdout.print(f"[bold]trained[/] background model (mu={outcome.config.train.perturb_mu:g}, "
                 f"L2 {outcome.config.train.weight_decay:g}) -> {bg.root}", highlight=False)
    if last:
        stdout.print(f"test bits/dim {last.test_bpd:.3f} (unperturbed test images) after epoch "
                     f"{last.epoch}; next: ood-audit score --run {rd.root} --ood mnist "
                     "(adds the likelihood-ratio detector)", highlight=False)
