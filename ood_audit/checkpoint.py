"""Checkpoints: weights in safetensors, with what rebuilds the model in the header.

The header metadata (all strings) holds the resolved run config, the model's resolved
config, its input shape, the data set, the preprocessing, the epoch and the package
version, so ``load_checkpoint`` needs nothing but the file. ActNorm's "initialised"
flag is a buffer, so it travels with the weights and a reload never re-initialises.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import UserError
from .models.base import DensityModel
from .models.registry import build_model, get_spec
from .parsing import from_dict
from .provenance import HEADER_KEY, ImportRecord, file_sha256, verify
from .runs import atomic_path

FORMAT = "ood-audit-checkpoint-1"
PREPROCESSING = "uniform dequantization x=(k+u)/256, 256 bins (Nalisnick et al. 2019, Glow)"


@dataclass
class CheckpointInfo:
    path: Path
    model: str
    model_config: Any  # the family's config dataclass
    input_shape: tuple[int, int, int]
    run_config: dict
    dataset: str
    epoch: int
    version: str
    sha256: str


def save_checkpoint(
    path: Path, model: DensityModel, *, model_name: str, model_config: Any,
    run_config: dict, dataset: str, epoch: int, metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model``'s weights and metadata atomically (temporary name, then rename).
    ``metadata``: more header entries (an imported run's record under ``import``)."""
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "model_config": json.dumps(dataclasses.asdict(model_config)),
        "input_shape": json.dumps(list(model.input_shape)),
        "run_config": json.dumps(run_config),
        "dataset": dataset,
        "preprocessing": PREPROCESSING,
        "epoch": str(epoch),
        "version": __version__,
        "arch": str(get_spec(model_name).arch),
        # The training objective's scale and clip, for whoever compares runs.
        "train.loss_scale": str(run_config.get("train", {}).get("loss_scale", "")),
        "train.max_grad_norm": str(run_config.get("train", {}).get("max_grad_norm", "")),
        **{f"model.{k}": v for k, v in model.extra_metadata().items()},
        **(metadata or {}),
    }
    # safetensors wants contiguous tensors that share no storage.
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def read_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a checkpoint, or a UserError saying why it is unusable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: train first (ood-audit train)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors checkpoint ({_short(exc)}); "
                        "it may be truncated: retrain or resume") from None
    fmt = meta.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith(FORMAT.rsplit("-", 1)[0] + "-"):
            raise UserError(f"{path} was written by another version of ood-audit (format "
                            f"{fmt!r}; this one reads {FORMAT!r}, ood-audit {__version__}): "
                            "use the version that wrote it, or retrain")
        raise UserError(f"{path} was not written by ood-audit train (format "
                        f"{fmt or 'missing'!r}, expected {FORMAT!r})")
    return meta


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[DensityModel, CheckpointInfo]:
    """Rebuild the model from a checkpoint file alone; errors are one-line UserErrors.

    A run made by ``ood-audit import`` is refused when a source file it was made from has
    changed or gone since (:func:`ood_audit.provenance.verify`), before anything is built.
    """
    path = Path(path)
    meta = read_metadata(path)
    name = meta.get("model", "")
    try:
        spec = get_spec(name)
    except UserError as exc:
        raise UserError(f"{path} holds model {name!r}, which this ood-audit cannot load ({exc}); "
                        "install the plugin that provides it, or upgrade ood-audit") from None
    if HEADER_KEY in meta:
        verify(ImportRecord.from_json(meta[HEADER_KEY], str(path)), str(path.parent))
    try:
        model_config = from_dict(spec.config_cls, json.loads(meta["model_config"]),
                                 where=f"{path} model_config")
        input_shape = tuple(json.loads(meta["input_shape"]))
        if len(input_shape) != 3 or not all(type(n) is int and n > 0 for n in input_shape):
            raise ValueError(f"input_shape {list(input_shape)} is not (C, H, W)")
        run_config = json.loads(meta["run_config"])
        epoch = int(meta["epoch"])
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: damaged checkpoint metadata ({_short(exc)})") from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors checkpoint ({_short(exc)}); "
                        "it may be truncated: retrain or resume") from None
    model_config, state = _upgrade(path, spec, meta, model_config, state, input_shape)
    try:
        model = build_model(name, model_config, input_shape)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: its metadata does not describe a buildable {name} model "
                        f"({_short(exc)})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not match a {name} model with its stored config "
                        f"({_short(exc)})") from None
    model.to(device).eval()
    info = CheckpointInfo(
        path=path, model=name, model_config=model_config, input_shape=input_shape,  # type: ignore[arg-type]
        run_config=run_config, dataset=meta.get("dataset", ""), epoch=epoch,
        version=meta.get("version", ""), sha256=file_sha256(path),
    )
    return model, info


def checkpoint_arch(meta: dict[str, str]) -> int:
    """The architecture version a checkpoint was written with (1 before the key existed)."""
    try:
        return int(meta.get("arch", "1"))
    except ValueError:
        return 0


def _upgrade(path: Path, spec, meta: dict[str, str], config: Any, state: dict,
             input_shape: tuple) -> tuple[Any, dict]:
    """An older architecture's checkpoint as today's layers, or a one-line refusal."""
    arch = checkpoint_arch(meta)
    if arch == spec.arch:
        return config, state
    if arch > spec.arch or arch < 1:
        raise UserError(f"{path} holds {spec.name} architecture {meta.get('arch')!r}, newer than "
                        f"this ood-audit {__version__} reads ({spec.arch}); upgrade ood-audit")
    if spec.upgrade is None or arch != 1:
        raise UserError(f"{path} predates this ood-audit's {spec.name} architecture "
                        f"({arch} < {spec.arch}) and cannot be converted; retrain it")
    return spec.upgrade(config, state, input_shape, str(path))


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold the same bytes as ``src``, atomically; a hard link saves disk."""
    tmp = dst.with_name(f".{dst.name}.link")
    if tmp.exists():
        tmp.unlink()
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:  # a full disk while copying: no half copy left behind
        tmp.unlink(missing_ok=True)
        raise


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
