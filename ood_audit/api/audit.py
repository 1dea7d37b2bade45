"""``ood_audit.audit``: score a model on its data and OOD sets in one call, through the
same library call as ``ood-audit score`` (:func:`ood_audit.commands.score.score`).

Where files go:

- a **run directory** (a path, or a ``RunDir``): scored in place, exactly as
  ``ood-audit score RUN --ood ...`` would (its ``scores/`` is replaced);
- a **model in memory** (a ``DensityModel``, or any module :func:`~.wrap.wrap_module`
  takes): scored into ``out`` when given (a new or previously audited folder, kept;
  ``ood-audit report OUT`` and ``decompose OUT`` work on it), else into a temporary
  folder (``ood-audit-*`` in the system's temporary directory) deleted with the result.
  The model is scored from memory: nothing is saved but the scores (no checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from .. import __version__
from ..checkpoint import CheckpointInfo, read_metadata
from ..commands.score import score
from ..config import ScoreConfig
from ..data.registry import in_memory_sets
from ..errors import UserError
from ..models.base import DensityModel
from ..runs import RunDir, ensure_dir, resolve_run
from .data import DataPlan, plan_data
from .result import AuditResult
from .wrap import weights_sha256, wrap_module

_SCORE_OPTIONS = {f.name for f in dataclasses.fields(ScoreConfig)} - {"ood", "detectors", "limit"}


def audit(model_or_run, in_data=None, ood=(), detectors=None, limit=None, *,
          out: str | Path | None = None, input_range: str = "0,1", discrete: bool = False,
          data_root: str | Path | None = None, download: bool = False, notify=print,
          **options) -> AuditResult:
    """See :func:`ood_audit.audit` (the public entry, which documents every argument)."""
    unknown = sorted(set(options) - _SCORE_OPTIONS)
    if unknown:
        raise UserError(f"audit() got unknown option {unknown[0]!r}; score options are "
                        f"{', '.join(sorted(_SCORE_OPTIONS))}")
    plan = plan_data(in_data, ood)
    if not plan.ood_names:
        raise UserError("audit(): name at least one OOD set, e.g. ood=['mnist'] (a name, a "
                        "path or an array)")
    cfg = ScoreConfig(ood=plan.ood_names, detectors=detectors, limit=limit, **options)
    root = None if data_root is None else Path(data_root)
    if isinstance(model_or_run, (str, os.PathLike, RunDir)):
        if out is not None or input_range != "0,1" or discrete:
            raise UserError("out, input_range and discrete apply to a model in memory; a run "
                            "directory is scored in place, with what its checkpoint records")
        rd = model_or_run if isinstance(model_or_run, RunDir) else resolve_run(Path(model_or_run))
        _check_in_data(rd, plan)
        with in_memory_sets(plan.held):
            result = score(rd, cfg, data_root=root, download=download, notify=notify)
        return AuditResult(rd, result.sets, held=plan.held, temporary=False)
    if plan.in_name is None:
        raise UserError("in_data: name the data the model was trained on (a registry name, a "
                        "path or an array); only a run directory knows its own")
    model = _density_model(model_or_run, plan, root, input_range, discrete)
    rd, temporary = _output_run(out)
    try:
        with in_memory_sets(plan.held):
            result = score(rd, cfg, data_root=root, download=download, notify=notify,
                           loaded=(model, _info(model, plan, rd, input_range, discrete)))
    except BaseException:
        if temporary:
            shutil.rmtree(rd.root, ignore_errors=True)
        raise
    return AuditResult(rd, result.sets, held=plan.held, temporary=temporary)


def _density_model(obj, plan: DataPlan, root, input_range: str, discrete: bool) -> DensityModel:
    """``obj`` itself when it is a DensityModel, else :func:`wrap_module` of it."""
    if isinstance(obj, DensityModel):
        if input_range != "0,1" or discrete:
            raise UserError(f"{type(obj).__name__} is a DensityModel (x in [0, 1) already): "
                            "input_range and discrete apply to a plain module")
        shape = plan.in_shape(root)
        if tuple(obj.input_shape) != tuple(shape):
            raise UserError(f"the model takes {_shape(obj.input_shape)} images, {plan.in_name} "
                            f"holds {_shape(shape)}")
        return obj
    if not isinstance(obj, nn.Module):
        raise UserError(f"audit() takes a run directory, a DensityModel or a torch.nn.Module; "
                        f"got {type(obj).__name__}"
                        + (" (a zuko flow: pass the flow, not flow())" if hasattr(obj, "log_prob")
                           else ""))
    return wrap_module(obj, plan.in_shape(root), input_range=input_range, discrete=discrete)


def _info(model: DensityModel, plan: DataPlan, rd: RunDir, input_range: str,
          discrete: bool) -> CheckpointInfo:
    """What a checkpoint would record, for a model scored from memory."""
    family = getattr(model, "family", None) or type(model).__name__.lower()
    run_config = {"source": "ood_audit.audit (in memory)", "model": family,
                  "data": plan.in_name, "input_range": input_range, "discrete": discrete}
    return CheckpointInfo(
        path=rd.root / "(in memory)", model=family, model_config=None,
        input_shape=tuple(model.input_shape), run_config=run_config,  # type: ignore[arg-type]
        dataset=str(plan.in_name), epoch=0, version=__version__,
        sha256=weights_sha256(model))


def _output_run(out) -> tuple[RunDir, bool]:
    """The folder a model in memory is scored into, and whether it is temporary."""
    if out is None:
        return RunDir(Path(tempfile.mkdtemp(prefix="ood-audit-"))), True
    rd = RunDir(Path(out))
    if rd.model.exists():
        raise UserError(f"{rd.root} holds a trained model (model.safetensors): to audit that "
                        "run pass its path as the model; name a new folder for out")
    ensure_dir(rd.root, "folder for the audit")
    return rd, False


def _check_in_data(rd: RunDir, plan: DataPlan) -> None:
    """A run knows its training set: in_data may only repeat it."""
    if plan.in_name is None:
        return
    if plan.in_name in plan.held:
        raise UserError("in_data: a run directory is audited on its own training set; pass "
                        "in_data=None")
    try:
        trained_on = read_metadata(rd.model).get("dataset")
    except UserError:
        return  # scoring says what is wrong with the checkpoint
    if trained_on and trained_on != plan.in_name:
        raise UserError(f"{rd.root} was trained on {trained_on}, not {plan.in_name}: pass "
                        f"in_data=None (or {trained_on!r})")


def _shape(shape) -> str:
    return "x".join(map(str, shape))
