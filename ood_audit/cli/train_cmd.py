"""``ood-audit train``: fit a density model on a data set into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import TrainRequest
from . import render
from .options import (
    Bf16Opt,
    ChannelsLastOpt,
    CompileOpt,
    ConfigOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    ModelOpt,
    PresetOpt,
    Tf32Opt,
    fast_paths,
)


def _opt(flag: str, text: str, kind: type = int):
    return Annotated[kind | None, typer.Option(flag, help=text, show_default=False)]


OutOpt = Annotated[Path | None, typer.Option("--out", "-o", show_default=False, help=(
    "Run directory. Default: runs/<model>-<data>-<time>."))]
EpochsOpt = _opt("--epochs", "Passes over the training set.")
BatchOpt = _opt("--batch-size", "Images per step: the GLOBAL batch. Under torchrun each of N "
                "ranks trains on batch/N of it (N must divide it), so a run with N ranks follows "
                "the trajectory of one process with the same --batch-size.")
LrOpt = _opt("--lr", "Peak learning rate (Adam, linear warm-up).", float)
SeedOpt = _opt("--seed", "Seed of init, data order and noise.")
SeedsOpt = _opt("--seeds", "An ensemble: one run per seed, e.g. --seeds 0,1,2,3,4, trained one "
                "after another into OUT/seed-<s> (each equal to a train --seed s run), listed in "
                "OUT/ensemble.json as they finish. --resume --out OUT continues the unfinished "
                "ones.", str)
LimitOpt = _opt("--limit", "Train on the first N images only.")
KeepOpt = _opt("--keep-checkpoints", "Per-epoch checkpoints kept for decompose "
               "--over-training: all, last or every:N. Default: all.", str)
DecayOpt = _opt("--weight-decay", "L2 weight decay (Adam's coupled decay). Default: 0, or 1e-4 "
                "with --background.", float)
ResumeOpt = Annotated[bool, typer.Option("--resume", help=(
    "Continue the run in --out from its last saved state (after Ctrl-C or a crash)."))]
BackgroundOpt = Annotated[bool, typer.Option("--background", help=(
    "Train the background model of the likelihood-ratio detector (Ren et al. 2019) for an "
    "existing run (--run, default runs/latest) into RUN/background: same model, preset and "
    "data, inputs perturbed with rate --mu, L2 --weight-decay. Other train flags override "
    "the run's for the background."))]
MuOpt = _opt("--mu", "With --background: probability that a training pixel is replaced by a "
             "uniform random value in 0..255. Default: 0.1.", float)
RunOpt = _opt("--run", "With --background: the run to add a background model to. Default: the "
              "last run trained (runs/latest); --out DIR names it too.", Path)


def train(
    model: ModelOpt = None, data: DataOpt = None, preset: PresetOpt = None,
    config: ConfigOpt = None, out: OutOpt = None, epochs: EpochsOpt = None,
    batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None,
    seeds: SeedsOpt = None, limit: LimitOpt = None, keep_checkpoints: KeepOpt = None,
    weight_decay: DecayOpt = None, device: DeviceOpt = None,
    channels_last: ChannelsLastOpt = False, compile: CompileOpt = False,
    bf16: Bf16Opt = False, tf32: Tf32Opt = False, resume: ResumeOpt = False,
    background: BackgroundOpt = False, mu: MuOpt = None, run: RunOpt = None,
    data_root: DataRootOpt = None, download: DownloadOpt = False,
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
    request = TrainRequest(
        config_file=config, model=model, data=data, preset=preset, out=out, resume=resume,
        seeds=seeds, background=background, mu=mu, run=run,
        train=dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, limit=limit,
                   keep_checkpoints=keep_checkpoints, weight_decay=weight_decay, device=device),
        fast_path=fast_paths(channels_last=channels_last, compile=compile, bf16=bf16, tf32=tf32))
    from ..commands.train import train  # the library: torch, loaded for the work

    progress = render.TrainBar()
    try:
        result = train(request, data_root=data_root, download=download, log=render.note,
                       progress=progress, on_member=render.member_trained)
    finally:
        progress.stop()
    render.trained(result)
