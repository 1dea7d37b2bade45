"""Option types shared by several subcommands, so their names and help never drift."""

from __future__ import annotations

from pathlib import Path

import typer

from ..analysis.detectors import DETECTORS
from ..data.registry import DATASETS
from ..models.fastpath_names import FAST_PATHS
from ..models.registry import MODELS


def _listing(registry: dict, attr: str = "summary") -> str:
    return "; ".join(f"{name}: {getattr(spec, attr)}" for name, spec in registry.items())


RunOpt = typer.Option(
    None, "--run", help="Run directory to use. Default: the last run trained (runs/latest)."
)
DataRootOpt = typer.Option(
    None, "--data-root", envvar="OOD_AUDIT_DATA",
    help="Folder holding the data sets (torchvision layout). Default: $OOD_AUDIT_DATA, "
    "else ~/.cache/ood-audit/data.",
)
DownloadOpt = typer.Option(
    False, "--download", help="Allow downloading missing data sets (needs network)."
)
DeviceOpt = typer.Option(
    None, "--device", help="auto (GPU when present), cpu, cuda or cuda:N."
)
MODEL_HELP = f"Model family. {_listing(MODELS)}."
DATA_HELP = (
    f"Data set name, or a path to a .npy/.npz array (N,H,W[,C] uint8) or a folder of images. "
    f"Names: {', '.join(DATASETS)}."
)
DETECTOR_HELP = "Detectors: " + "; ".join(
    f"{name} (needs {d.requires})" for name, d in DETECTORS.items()) + "."
OOD_HELP = (
    "An out-of-distribution set to score; repeat for several. A registry name "
    f"({', '.join(DATASETS)}) or a path to a .npy/.npz file or an image folder. Sets of "
    "another shape are adapted to the model's (gray<->RGB, resize) and the rule is printed."
)


def path_or_none(value: Path | None) -> Path | None:
    return Path(value) if value is not None else None


def _fast(name: str) -> typer.models.OptionInfo:
    flag = "--" + name.replace("_", "-")
    return typer.Option(False, flag, help=f"Glow fast path: {FAST_PATHS[name]}. Recorded in the "
                        "scores' metadata (model.fast_path). Default: the exact float32 path.")


#: One opt-in flag per fast path (ood_audit/models/fastpath.py), same names as the options.
ChannelsLastOpt, CompileOpt, Bf16Opt, Tf32Opt = (_fast(n) for n in ("channels_last", "compile",
                                                                      "bf16", "tf32"))


def fast_path_options(**flags: bool) -> dict[str, object]:
    """The model options (``set_score_option``) for the fast-path flags that are on."""
    return {name: True for name, on in flags.items() if on}
