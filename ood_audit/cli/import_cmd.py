"""``ood-audit import KIND``: a run directory from a model trained elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import ImportRequest
from ..models.input_ranges import DISCRETE_HELP, INPUT_RANGES
from . import render
from .options import DataRootOpt, DownloadOpt

app = typer.Typer(
    help="Make a run directory from a model trained elsewhere, so that score, decompose and "
    "report audit it as a trained run: a y0ast/Glow-PyTorch or rosinality/glow-pytorch "
    "checkpoint (read as data), or any torch module with a log_prob from a Python file. "
    "The run records the source files with their sha256 (RUN/import.json); a command that "
    "loads the model refuses a source changed since.",
    no_args_is_help=True,
)

DataOpt = Annotated[str, typer.Option("--data", "-d", show_default=False, help=(
    "The set the model was trained on: a registry name (fashionmnist, cifar10, ...) or the "
    "path of your images. Its test split is the in-distribution set score compares OOD sets "
    "with, and its image shape the model's."))]
OutOpt = Annotated[Path, typer.Option("--out", "-o", show_default=False, help=(
    "Run directory to create (it must not hold a run)."))]
CheckpointArg = Annotated[Path, typer.Argument(metavar="CHECKPOINT", show_default=False, help=(
    "The saved state dict (torch.save(model.state_dict()), read with weights_only=True)."))]
HparamsOpt = Annotated[Path, typer.Option("--hparams", show_default=False, help=(
    "The hparams.json y0ast's train.py writes beside its checkpoints (K, L, "
    "hidden_channels, flow_coupling, flow_permutation, LU_decomposed, learn_top, ...)."))]
NFlowOpt = Annotated[int, typer.Option("--n-flow", show_default=False, help=(
    "Flows per block (its train.py's --n_flow, K)."))]
NBlockOpt = Annotated[int, typer.Option("--n-block", show_default=False, help=(
    "Blocks (its train.py's --n_block, L)."))]
AffineOpt = Annotated[bool, typer.Option("--affine", help=(
    "The model has affine coupling (trained with --affine); default additive, as its train.py."))]
NoLuOpt = Annotated[bool, typer.Option("--no-lu", help=(
    "The model has plain 1x1 convolutions (trained with --no_lu); default LU-decomposed."))]
ModuleArg = Annotated[str, typer.Argument(metavar="FILE.py:FACTORY", show_default=False, help=(
    "The Python file to run and the name in it of a function or class whose call returns "
    "the torch.nn.Module, e.g. flow.py:make_flow."))]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", show_default=False, help=(
    "A state dict to load into the module (.safetensors, or .pt/.pth read with "
    "weights_only=True). Default: the weights FACTORY() gives."))]
RangeOpt = Annotated[str | None, typer.Option("--input-range", show_default=False, help=(
    f"What the module's log_prob takes: one of {', '.join(INPUT_RANGES)} (0,255: y = 256 x = "
    "k + u). x in [0, 1) is mapped to y = a x + b and D log|a| added to log p(x) as the term "
    "logdet_input, so bits/dim compare with every other model. Default: 0,1."))]
DiscreteOpt = Annotated[bool, typer.Option("--discrete", help=DISCRETE_HELP + ".")]
ShapeOpt = Annotated[str | None, typer.Option("--input-shape", show_default=False, help=(
    "The per-image shape log_prob takes, e.g. 784 for a flat flow or 1,28,28. Default: the "
    "data's C,H,W."))]


def _import(req: ImportRequest, data_root: Path | None, download: bool) -> None:
    from ..commands.import_model import import_model  # the library: torch, for the work

    render.imported(import_model(req, data_root=data_root, download=download))


@app.command("y0ast")
def y0ast(checkpoint: CheckpointArg, hparams: HparamsOpt, data: DataOpt, out: OutOpt,
          data_root: DataRootOpt = None, download: DownloadOpt = False) -> None:
    """Import a y0ast/Glow-PyTorch checkpoint as a glow run (glow-cv with additive coupling),
    with Glow's per-level terms. The port's input x - 0.5 (x dequantized in [0, 1)) is ours:
    the same images get the port's own log p(x).

    Example: ood-audit import y0ast out/glow_model_250.pth --hparams out/hparams.json --data cifar10 --out runs/y0
    """
    _import(ImportRequest(kind="y0ast", source=str(checkpoint), hparams=hparams, data=data,
                          out=out), data_root, download)


@app.command("rosinality")
def rosinality(checkpoint: CheckpointArg, n_flow: NFlowOpt, n_block: NBlockOpt, data: DataOpt,
               out: OutOpt, affine: AffineOpt = False, no_lu: NoLuOpt = False,
               data_root: DataRootOpt = None, download: DownloadOpt = False) -> None:
    """Import a rosinality/glow-pytorch checkpoint as a glow run (glow-cv when additive), with
    Glow's per-level terms; the hidden width is read off the weights. Give the flags it was
    trained with. Its input is x - 0.5, as ours; ood-audit scores 8-bit images, so a model
    trained with --n_bits 5 (its default) is scored as a density of 8-bit images.

    Example: ood-audit import rosinality model_010001.pt --n-flow 32 --n-block 4 --affine --data celeba --out runs/r
    """
    _import(ImportRequest(kind="rosinality", source=str(checkpoint), n_flow=n_flow,
                          n_block=n_block, affine=affine, lu=not no_lu, data=data, out=out),
            data_root, download)


@app.command("python")
def python(module: ModuleArg, data: DataOpt, out: OutOpt, weights: WeightsOpt = None,
           input_range: RangeOpt = None, discrete: DiscreteOpt = False,
           input_shape: ShapeOpt = None, data_root: DataRootOpt = None,
           download: DownloadOpt = False) -> None:
    """Import any torch module with a log-density: this runs FILE as Python (FILE only: weights
    are read as data), calls FACTORY() and audits the module it returns.

    Its log_prob(y) gives [B] log-densities in nats of y, the image x in [0, 1) mapped to
    --input-range (or, with --discrete, uint8 pixels and log P(k)). Its terms become columns
    when it has ood-audit's log_prob_terms(y) (a dict of [B] terms), or when a flow library's
    adapter knows it; else log_prob is the one term. The import checks it on the first test
    images (finite, [B], the same for an image alone as in a batch). score runs FILE again,
    after checking its sha256.

    Example: ood-audit import python flow.py:make_flow --weights flow.pt --input-range -1,1 --data mnist --out runs/m
    """
    _import(ImportRequest(kind="python", source=module, weights=weights, input_range=input_range,
                          discrete=discrete, input_shape=input_shape, data=data, out=out),
            data_root, download)
