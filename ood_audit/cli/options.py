"""Option types shared by several subcommands, so their names and help never drift."""

from __future__ import annotations

from pathlib import Path

import typer

from ..analysis.detectors import DETECTORS
from ..data import DATASETS
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
