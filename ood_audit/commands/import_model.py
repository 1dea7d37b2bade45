"""``ood-audit import`` as one library call: a run directory from a model trained elsewhere.

:func:`import_model` reads what :class:`~ood_audit.config.ImportRequest` names, builds our
model of it, checks it on the first test images of the declared training set, and only
then writes the run: ``RUN/model.safetensors`` (its header holds the import record) and
``RUN/import.json`` (the record: kind, source files with their sha256, training set,
input range and shape; :mod:`ood_audit.provenance`). Bad input writes nothing.

- ``y0ast`` / ``rosinality``: the state dict (read as data, :mod:`~ood_audit.models.state_files`)
  converted to our Glow (:mod:`~ood_audit.models.glow_convert`): the run is a plain
  ``glow`` (or, with additive coupling, ``glow-cv``) run, with Glow's per-level terms.
- ``python``: FILE is run and ``FACTORY()`` wrapped as the ``imported`` family
  (:mod:`~ood_audit.models.imported`); the module's weights (``--weights`` loaded into it,
  or as the factory made them) are saved in the run's checkpoint.

``score``, ``decompose`` and ``report`` then work on the run as on a trained one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..checkpoint import save_checkpoint
from ..config import ImportRequest
from ..data.preprocess import bits_per_dim, dequantize
from ..data.registry import DATASETS, load_dataset
from ..errors import UserError
from ..models.base import DensityModel, sum_terms
from ..models.glow_convert import from_rosinality, from_y0ast
from ..models.imported import DISCRETE_TERM, INPUT_TERM, ImportedConfig, ImportedModel, build_imported
from ..models.registry import build_model
from ..models.state_files import read_state_dict
from ..provenance import HEADER_KEY, IMPORT_FILE, ImportRecord, Source
from ..runs import RUNS_ROOT, RunDir, atomic_write_text, refuse_if_locked, run_lock, set_latest
from ..scoring.schema import FIXED_COLUMNS, totals_for

#: Test images of the declared training set every import is checked on.
CHECK_IMAGES = 16
#: The hparams of y0ast's train.py that define the model (kept in the record).
Y0AST_KEYS = ("K", "L", "hidden_channels", "flow_coupling", "flow_permutation", "LU_decomposed",
              "learn_top", "y_condition", "actnorm_scale")


@dataclass
class ImportResult:
    """What ``import`` made: the run, its record, the family and terms its scores will
    have, and the mean bits/dim of the first test images (a sanity figure)."""

    run: Path
    record: ImportRecord
    model: str  # the checkpoint's family: glow, glow-cv or imported
    terms: list[str]
    terms_from: str  # converted Glow, log_prob, log_prob_terms or adapter:<library>
    mean_bpd: float
    n_checked: int


@dataclass
class Built:
    model: DensityModel
    family: str
    config: Any  # the family's config dataclass
    sources: list[Source]
    options: dict[str, Any]
    terms_from: str


def import_model(req: ImportRequest, *, data_root: Path | None = None, download: bool = False,
                 runs_root: Path = RUNS_ROOT) -> ImportResult:
    """Make the run ``req.out`` from ``req`` (module docstring); points ``runs/latest`` at
    it. Every check comes before the first write: a bad input leaves nothing behind."""
    rd = RunDir(req.out)
    refuse_if_locked(rd)
    _check_new(rd)
    images = _check_images(req.data, data_root, download)
    shape = tuple(images.shape[1:])
    built = {"y0ast": _y0ast, "rosinality": _rosinality, "python": _python}[req.kind](req, shape)
    built.model.eval()
    x = dequantize(images, generator=torch.Generator().manual_seed(0))
    log_px, terms = check_model(built.model, x, where=str(req.source), data=req.data)
    record = ImportRecord(
        kind=req.kind, sources=built.sources, data=req.data, input_shape=list(shape),
        input_range=built.model.config.input_range if isinstance(built.model, ImportedModel)
        else "-0.5,0.5", discrete=req.discrete, model=built.family, options=built.options,
        version=__version__)
    created = not rd.root.exists()
    try:
        with run_lock(rd, "ood-audit import"):
            _check_new(rd)  # again under the lock: another import may have finished meanwhile
            save_checkpoint(rd.model, built.model, model_name=built.family,
                            model_config=built.config,
                            run_config={"model": built.family, "data": req.data,
                                        "import": dataclasses.asdict(record)},
                            dataset=req.data, epoch=0, metadata={HEADER_KEY: record.to_json()})
            atomic_write_text(rd.root / IMPORT_FILE, record.to_json())
    except BaseException:
        # a write that failed (a full disk, Ctrl-C) leaves no half run behind: the folder
        # this import made goes, so the same command works once the fault is fixed
        if created:
            shutil.rmtree(rd.root, ignore_errors=True)
        raise
    set_latest(rd.root, runs_root)
    mean_bpd = float(bits_per_dim(log_px, math.prod(shape)).mean())
    return ImportResult(rd.root, record, built.family, terms, built.terms_from, mean_bpd, len(x))


def _check_new(rd: RunDir) -> None:
    if rd.root.exists() and not rd.root.is_dir():
        raise UserError(f"--out {rd.root} is a file, not a run directory: name a folder")
    if rd.model.exists() or (rd.root / IMPORT_FILE).exists() or rd.train_state.exists():
        raise UserError(f"{rd.root} already holds a run: pass another --out")


def _check_images(data: str, root: Path | None, download: bool) -> Tensor:
    """The first test images of the declared training set, uint8 ``[N, C, H, W]``."""
    spec = DATASETS.get(data)
    if spec is not None and spec.shape is None:
        raise UserError(f"--data {data} is a synthetic set; name the set the model was trained "
                        "on (e.g. fashionmnist, or the path of your images)")
    return load_dataset(data, "test", root=root, download=download, limit=CHECK_IMAGES).images


def _file(path: Path | str, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no {what} at {path}")
    return path


# ------------------------------------------------------------------- the three kinds
def _y0ast(req: ImportRequest, shape: tuple[int, int, int]) -> Built:
    ckpt = _file(req.source, "y0ast/Glow-PyTorch checkpoint")
    hp_path = _file(req.hparams, "hparams.json (y0ast's train.py writes it beside the checkpoints)")
    try:
        hparams = json.loads(hp_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{hp_path} is not JSON ({exc})") from None
    if not isinstance(hparams, dict):
        raise UserError(f"{hp_path} holds a {type(hparams).__name__}, not the mapping of "
                        "hyperparameters y0ast's train.py writes")
    state = read_state_dict(ckpt, "a y0ast/Glow-PyTorch model")
    config, converted = from_y0ast(state, hparams, shape, where=str(ckpt))
    sources = [Source.of("checkpoint", ckpt), Source.of("hparams", hp_path)]
    return _glow(config, converted, shape, sources,
                 {"hparams": {k: hparams[k] for k in Y0AST_KEYS if k in hparams}})


def _rosinality(req: ImportRequest, shape: tuple[int, int, int]) -> Built:
    ckpt = _file(req.source, "rosinality/glow-pytorch checkpoint")
    state = read_state_dict(ckpt, "a rosinality/glow-pytorch model")
    config, converted = from_rosinality(state, n_flow=req.n_flow, n_block=req.n_block,
                                        affine=req.affine, lu=req.lu, input_shape=shape,
                                        where=str(ckpt))
    options = {"n_flow": req.n_flow, "n_block": req.n_block, "affine": req.affine, "lu": req.lu}
    return _glow(config, converted, shape, [Source.of("checkpoint", ckpt)], options)


def _glow(config, state: dict[str, Tensor], shape, sources: list[Source], options) -> Built:
    family = "glow" if config.coupling == "affine" else "glow-cv"
    model = build_model(family, config, shape)
    model.load_state_dict(state)  # strict: the converter filled every tensor
    return Built(model, family, config, sources, options, "converted Glow")


def _python(req: ImportRequest, shape: tuple[int, int, int]) -> Built:
    file, factory = req.factory_parts()
    file = _file(file, "Python file").resolve()
    weights = _file(req.weights, "weights file") if req.weights is not None else None
    sources = [Source.of("module", file)] + ([Source.of("weights", weights)] if weights else [])
    config = ImportedConfig(file=str(file), factory=factory, file_sha256=sources[0].sha256,
                            input_range=req.resolved_input_range, discrete=req.discrete,
                            module_shape=req.module_shape())
    model = build_imported(config, shape)
    if weights is not None:
        _load_weights(model.module, read_state_dict(weights, f"{file.name}:{factory}"),
                      weights, f"{file.name}:{factory}")
    odd = [k for k, v in model.state_dict().items() if not isinstance(v, Tensor)]
    if odd:
        raise UserError(f"{file}:{factory}()'s state dict holds non-tensor entries ({odd[0]!r}), "
                        "which a safetensors checkpoint cannot keep")
    options = {"factory": factory, "module_shape": config.module_shape, "terms_from": model.source}
    return Built(model, "imported", config, sources, options, model.source)


def _load_weights(module: nn.Module, state: dict[str, Tensor], path: Path, where: str) -> None:
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch: torch's message names the tensor
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise UserError(f"{path} does not fit {where}: {lines[0] if lines else exc}") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        parts = [f"{label} {keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise UserError(f"{path} does not fit {where}: {', '.join(parts)}; save the module's "
                        "own state_dict()")


# ------------------------------------------------------------------------ the checks
@torch.no_grad()
def check_model(model: DensityModel, x: Tensor, *, where: str, data: str) -> tuple[Tensor, list[str]]:
    """log p(x) of the check images ``x`` (float64 ``[N]``) and the term names, after the
    checks every import passes: finite, no term named like a column of the scores, the
    same log p(x) for an image alone as in its batch, a probability <= 1 for a discrete
    module, and a module's own terms summing to its ``log_prob``."""
    terms = model.log_prob_terms(x)
    names = list(terms)
    clash = [n for n in names if n in FIXED_COLUMNS or n in totals_for(names)]
    if clash:
        raise UserError(f"{where} names a term {clash[0]!r}, a column ood-audit writes itself: "
                        "rename it")
    log_px = sum_terms({k: v.double() for k, v in terms.items()})
    bad = ~torch.isfinite(log_px)
    if bool(bad.any()):
        what = "NaN" if bool(torch.isnan(log_px).any()) else "infinite"
        raise UserError(f"{where} gives {what} log p(x) for {int(bad.sum())} of the first "
                        f"{len(x)} test images of {data}: check the weights, --input-range and "
                        "--discrete")
    alone = model.log_prob(x[:1]).double()[0]
    if not _close(alone, log_px[0]):
        raise UserError(f"{where} gives an image another log p(x) alone ({float(alone):.4f}) than "
                        f"in a batch ({float(log_px[0]):.4f}): it must not depend on the other "
                        "images (a BatchNorm in training mode?)")
    if isinstance(model, ImportedModel):
        _check_imported(model, x, terms, log_px, where)
    return log_px, names


def _check_imported(model: ImportedModel, x: Tensor, terms: dict[str, Tensor], log_px: Tensor,
                    where: str) -> None:
    if model.config.discrete:
        log_pk = log_px - terms[DISCRETE_TERM].double()
        if bool((log_pk > 1e-3).any()):
            raise UserError(f"{where} was declared --discrete but gives log P(k) = "
                            f"{float(log_pk.max()):.4g} > 0, a density rather than a "
                            "probability: drop --discrete")
    if model.own_terms and callable(getattr(model.module, "log_prob", None)):
        own = sum_terms({k: v.double() for k, v in terms.items()
                         if k not in (INPUT_TERM, DISCRETE_TERM)})
        try:
            direct = model.module.log_prob(model.module_input(x)).double().reshape(-1)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line
            raise UserError(f"{where}: log_prob raised {type(exc).__name__}: {exc}") from None
        if direct.shape != own.shape:
            raise UserError(f"{where}: log_prob gives {direct.numel()} values for {len(own)} "
                            "images; it must give one per image")
        if not all(_close(a, b) for a, b in zip(own, direct, strict=True)):
            raise UserError(f"{where}: log_prob_terms sum to {float(own[0]):.4f} but log_prob "
                            f"gives {float(direct[0]):.4f} for the first image; they must agree")


def _close(a: Tensor, b: Tensor) -> bool:
    return abs(float(a) - float(b)) <= 1e-4 * abs(float(b)) + 1e-3
