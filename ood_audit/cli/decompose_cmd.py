"""``ood-audit decompose``: which term of log p(x) carries the OOD likelihood gap."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import DecomposeConfig
from . import render
from .options import CenterOpt, DataRootOpt, DeviceOpt, RunArg, RunOpt, default, one_run

CsvOpt = Annotated[bool, typer.Option(
    "--csv", help="Write decomposition.csv instead of decomposition.parquet.")]
OverOpt = Annotated[bool, typer.Option("--over-training", help=(
    "Also rescore a fixed subset of each scored set with every epoch checkpoint and "
    "tabulate log p(z) and log|det| per epoch (the paper's plots over training); writes "
    "over_training.parquet."))]
OverLimitOpt = Annotated[int, typer.Option(
    "--over-training-limit", help="Images per set rescored for --over-training.")]
SecondOpt = Annotated[bool, typer.Option("--second-order", help=(
    "Also predict each OOD set's gap in mean log p(x) from second-order statistics, 1/2 "
    "Tr(H (Sigma_ood - Sigma_in)) with H the Hessian of log p(x) at the expansion point "
    "(Nalisnick et al. 2019, section 5), by Hessian-vector products; for glow-cv also the "
    "paper's closed form from per-channel variances and the 1x1 conv weights. Sets it "
    "beside the measured gap on the same images; writes second_order.json. Flows only "
    "(glow, glow-cv): PixelCNN++ and the VAE model integer pixels, so their log p(x) has "
    "no Hessian."))]
SecondLimitOpt = Annotated[int, typer.Option("--second-order-limit", help=(
    "Images per set for --second-order (the first N of each set, dequantized as the "
    "scorer did)."))]
SecondBatchOpt = Annotated[int, typer.Option(
    "--second-order-batch", help="Hessian-vector products per batch for --second-order.")]


def decompose(
    run: RunArg = None, csv: CsvOpt = False, over_training: OverOpt = False,
    over_training_limit: OverLimitOpt = default(DecomposeConfig, "over_training_limit"),
    second_order: SecondOpt = False,
    second_order_limit: SecondLimitOpt = default(DecomposeConfig, "second_order_limit"),
    second_order_batch: SecondBatchOpt = default(DecomposeConfig, "second_order_batch"),
    second_order_center: CenterOpt = default(DecomposeConfig, "second_order_center"),
    device: DeviceOpt = None, data_root: DataRootOpt = None, run_option: RunOpt = None,
) -> None:
    """Split log p(x) into its terms per data set (log p(z), log|det| per level and
    layer kind for a flow) and say which term carries each OOD set's likelihood gap.

    Reads the run's scores; writes decomposition.parquet (or .csv) into the run.
    """
    cfg = DecomposeConfig(
        csv=csv, over_training=over_training, over_training_limit=over_training_limit,
        second_order=second_order, second_order_limit=second_order_limit,
        second_order_batch=second_order_batch, second_order_center=second_order_center,
        device=device or default(DecomposeConfig, "device"))
    from ..commands.decompose import decompose  # the library: torch, loaded once the options hold

    with render.CountBar() as progress:  # images rescored, then Hessian-vector products
        result = decompose(one_run(run, run_option), cfg, data_root=data_root, progress=progress,
                           second_order_progress=progress)
    render.decomposed(result)
