"""``ood-audit score``: per-image likelihood terms of in-distribution and OOD sets."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import ScoreConfig
from . import render
from .options import (
    Bf16Opt,
    ChannelsLastOpt,
    CompileOpt,
    DataRootOpt,
    DetectorOpt,
    DeviceOpt,
    DownloadOpt,
    MemberOpt,
    OodOpt,
    RunArg,
    RunOpt,
    Tf32Opt,
    TransformOpt,
    default,
    fast_paths,
    one_run,
)

LimitOpt = Annotated[int | None, typer.Option(
    "--limit", help="Score the first N images of each set.", show_default=False)]
TrainLimitOpt = Annotated[int, typer.Option("--train-limit", help=(
    "In-distribution TRAIN images scored too (for the paper's train/test/OOD histogram and "
    "the detectors that fit on them); 0 to skip."))]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the dequantization noise.")]
IwOpt = Annotated[int | None, typer.Option("--iw-samples", show_default=False, help=(
    "vae and hvae: importance samples K of the IWAE bound log p(x) >= E_q log (1/K sum_k "
    "p(x,z_k)/q(z_k|x)) (more = tighter, slower)."))]
HeldOutOpt = Annotated[bool, typer.Option("--held-out", help=(
    "Take the in-distribution train rows (what detectors such as typicality fit on) from "
    "train images the model never saw: those after its training --limit N. Default: the "
    "first --train-limit train images. The density-of-states detectors (dose...) need it: "
    "they refuse to fit on the model's own training images."))]
WorkersOpt = Annotated[int | None, typer.Option("--workers", show_default=False, help=(
    "DataLoader worker processes that dequantize the next images while the model scores "
    "(pinned memory on CUDA). Default: 2 on CUDA, 0 on CPU, where workers would compete "
    "with the forward pass for cores. The scores do not depend on it (the noise is seeded "
    "per chunk of 1,024 images)."))]


def score(
    run: RunArg = None, ood: OodOpt = None, limit: LimitOpt = None,
    train_limit: TrainLimitOpt = default(ScoreConfig, "train_limit"),
    batch_size: BatchOpt = default(ScoreConfig, "batch_size"),
    seed: SeedOpt = default(ScoreConfig, "seed"), iw_samples: IwOpt = None,
    detector: DetectorOpt = None, member: MemberOpt = None, held_out: HeldOutOpt = False,
    transform: TransformOpt = None, workers: WorkersOpt = None, device: DeviceOpt = None,
    data_root: DataRootOpt = None, download: DownloadOpt = False,
    channels_last: ChannelsLastOpt = False, compile: CompileOpt = False,
    bf16: Bf16Opt = False, tf32: Tf32Opt = False, run_option: RunOpt = None,
) -> None:
    """Score the in-distribution test split and each --ood set with the run's checkpoint.

    Writes RUN/scores/part-0.parquet: one row per image, one column per likelihood term
    (log p(z) per level, log|det| per level and layer kind), log_px and bits/dim, and
    the inputs of each detector (background log p(x) with RUN/background, members'
    log p(x) and the ensemble's with --member, PNG length); readers add the detector
    scores. RUN an ensemble folder (train --seeds) scores every member.

    Sharded across N processes (each writes RUN/scores/part-<rank>.parquet; the numbers
    are the same):

    torchrun --nproc_per_node N -m ood_audit score RUN --ood mnist

    Example: ood-audit score runs/latest --ood mnist --ood noise-uniform --limit 2000

    Variance sweep: ood-audit score --ood svhn --transform contrast=0.5 --transform grayscale

    Ctrl-C stops with exit code 130; RUN/scores keeps its previous table (a partial one is
    never published).
    """
    cfg = ScoreConfig(
        ood=list(ood or []), limit=limit, train_limit=train_limit, batch_size=batch_size,
        seed=seed, held_out=held_out, transforms=list(transform or []),
        detectors=list(detector) if detector else None, members=list(member or []),
        iw_samples=iw_samples, workers=workers, device=device or default(ScoreConfig, "device"),
        fast_path=fast_paths(channels_last=channels_last, compile=compile, bf16=bf16, tf32=tf32))
    from ..commands.score import score  # the library: torch, loaded once the options hold

    with render.CountBar() as progress:
        result = score(one_run(run, run_option), cfg, data_root=data_root, download=download,
                       notify=render.note, progress=progress)
    if result.is_main:
        render.scored(result)
