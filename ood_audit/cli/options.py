"""The options of every subcommand, as shared ``Annotated`` aliases with one type each.

Choices and help come from the registries (models, data sets, detectors, transforms,
fast paths, gate metrics), defaults from the config dataclasses (:func:`default`), so
neither is written twice. Everything imported here is light: ``ood-audit --help`` and an
argument error load no torch, pandas or matplotlib.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ..analysis.detectors import detectors_help
from ..config import REPORT_FORMATS, SECOND_ORDER_CENTERS
from ..data.registry import DATASETS
from ..data.transforms import TRANSFORMS
from ..errors import UserError
from ..models.catalog import family_summaries
from ..models.fastpath_names import FAST_PATHS
from ..report.gates import GATE_METRICS


def default(cls: type, name: str) -> object:
    """The default of field ``name`` of config dataclass ``cls``: the one place it is stated."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def one_run(positional: Path | None, option: Path | None) -> Path | None:
    """RUN given as the argument or (the older spelling) ``--run``; not both, differently."""
    if positional is not None and option is not None and Path(positional) != Path(option):
        raise UserError(f"the run is given twice ({positional} and --run {option}): give it once")
    return positional if positional is not None else option


_RUN_HELP = "Run directory to use. Default: the last run trained (runs/latest)."

# ------------------------------------------------------------------ shared
RunArg = Annotated[Path | None, typer.Argument(
    metavar="RUN", help=_RUN_HELP + " (Under torchrun give it here, not as --run, which "
    "torchrun's parser takes for its --run-path.)", show_default=False)]
RunOpt = Annotated[Path | None, typer.Option("--run", hidden=True, help=_RUN_HELP)]
DataRootOpt = Annotated[Path | None, typer.Option(
    "--data-root", envvar="OOD_AUDIT_DATA", show_default=False,
    help="Folder holding the data sets (torchvision layout). Default: $OOD_AUDIT_DATA, "
    "else ~/.cache/ood-audit/data.")]
DownloadOpt = Annotated[bool, typer.Option(
    "--download", help="Allow downloading missing data sets (needs network).")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="auto (GPU when present), cpu, cuda or cuda:N. Default: auto.",
    show_default=False)]


def _fast(name: str):
    return Annotated[bool, typer.Option(
        "--" + name.replace("_", "-"), help=f"Glow fast path: {FAST_PATHS[name]}. Recorded in "
        "the metadata (model.fast_path). Default: the exact float32 path.")]


#: One opt-in flag per fast path (ood_audit/models/fastpath_names.py), same names.
ChannelsLastOpt, CompileOpt, Bf16Opt, Tf32Opt = (_fast(n) for n in FAST_PATHS)


def fast_paths(**flags: bool) -> list[str]:
    """The fast paths whose flags are on."""
    return [name for name, on in flags.items() if on]


# ------------------------------------------------------------------ train
MODEL_HELP = "Model family. " + "; ".join(f"{n}: {s}" for n, s in family_summaries().items()) + "."
DATA_HELP = ("Data set name, or a path to a .npy/.npz array (N,H,W[,C] uint8) or a folder of "
             f"images. Names: {', '.join(DATASETS)}.")
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help=MODEL_HELP + " Default: glow.", show_default=False)]
DataOpt = Annotated[str | None, typer.Option(
    "--data", "-d", help=DATA_HELP + " Default: fashionmnist.", show_default=False)]
PresetOpt = Annotated[str | None, typer.Option(
    "--preset", show_default=False, help="Size preset: tiny (tests), small (CPU demo), paper "
    "(L=3, K=32, 512 hidden; a GPU). Default: small.")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", show_default=False, help="YAML file with model, preset, data, "
    "model_config and train keys (see examples/demo.yaml); flags given here override it.")]

# ------------------------------------------------------------------ score
OOD_HELP = (
    "An out-of-distribution set to score; repeat for several. A registry name "
    f"({', '.join(DATASETS)}) or a path to a .npy/.npz file or an image folder. Sets of "
    "another shape are adapted to the model's (gray<->RGB, resize) and the rule is printed.")
TRANSFORM_HELP = (
    "Also score a transformed copy of the in-distribution test set and of every --ood set "
    "(uint8 pixels, after the shape adaptation, before dequantization), tagged in the "
    "Parquet's transform column; repeat for several. The untransformed sets are always "
    "scored. " + "; ".join(f"{s.usage}: {s.summary}" for s in TRANSFORMS.values()) + ".")
OodOpt = Annotated[list[str] | None, typer.Option("--ood", help=OOD_HELP, show_default=False)]
TransformOpt = Annotated[list[str] | None, typer.Option(
    "--transform", metavar="NAME[=ARG]", help=TRANSFORM_HELP, show_default=False)]
DetectorOpt = Annotated[list[str] | None, typer.Option(
    "--detector", show_default=False, help="A detector to add as a score_<name> column; repeat "
    "for several. Default: every one whose needs are met, except likelihood-regret (an "
    "optimisation per image: name it). Detectors: " + detectors_help() + ".")]
MemberOpt = Annotated[list[Path] | None, typer.Option(
    "--member", show_default=False, help="Another run trained on the same data: with this run "
    "it forms the ensemble of the waic and ensemble detectors (this run is member 0); repeat "
    "for more. An ensemble folder (RUN written by train --seeds) brings its own.")]

# ------------------------------------------------------------------ decompose, report
CenterOpt = Annotated[str, typer.Option(
    "--second-order-center", help="Expansion point x0 for --second-order: 'pooled' (the "
    "shared mean of the in-distribution test set and the OOD set together, one x0 per OOD "
    "set, as the paper's expansion about a shared mean) or 'in' (the in-distribution test "
    "mean; on FashionMNIST -> MNIST Glows this point is far from MNIST and the quadratic "
    f"expansion there gets the sign wrong). One of: {', '.join(SECOND_ORDER_CENTERS)}.")]
RunsArg = Annotated[list[Path] | None, typer.Argument(
    metavar="RUNS...", help="Run directories, shown side by side. Default: the last run "
    "trained (runs/latest).", show_default=False)]
FormatOpt = Annotated[str, typer.Option("--format", help="Comma-separated outputs: " + ", ".join(
    f"{k} ({v})" for k, v in REPORT_FORMATS.items()) + ".")]
GateOpt = Annotated[list[str] | None, typer.Option("--gate", show_default=False, help=(
    "A CI gate DATASET[:DETECTOR]:METRIC OP BOUND, e.g. 'mnist:auroc>=0.9' or "
    "'mnist:likelihood:fpr95<0.2'; repeat for several. OP: >= <= > <. METRIC: "
    f"{', '.join(m for m in GATE_METRICS if '_ci_' not in m)}, or a metric's interval "
    "bound (auroc_ci_low, ...). Exit 1 when one fails (the report is still written)."))]
