"""``ood-audit train`` as one library call: a run, an ensemble of seeds, or the
background model of a run's likelihood ratio.

:class:`~ood_audit.config.TrainRequest` is what the command is asked, as given (None:
not given); its checks say which options go together. :func:`train` builds the run's
config (:class:`~ood_audit.config.RunConfig`: the ``--config`` file, then the flags) and calls
:func:`~ood_audit.training.run.train_run`, :func:`~ood_audit.training.ensemble.train_ensemble`
or :func:`~ood_audit.training.background.train_background`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainRequest
from ..errors import SaidByRankZero, UserError
from ..runs import ENSEMBLE_FILE, RunDir, resolve_run
from ..torchrun_env import dist_env
from ..training.background import DEFAULT_MU, DEFAULT_WEIGHT_DECAY, train_background
from ..training.ensemble import member_name, parse_seeds, train_ensemble
from ..training.run import TrainOutcome, train_run
from ..training.trainer import TrainProgress


@dataclass
class TrainResult:
    """What ``train`` trained: ``kind`` is ``run``, ``ensemble`` or ``background``;
    one outcome per run trained (per member of an ensemble)."""

    kind: str
    outcomes: list[TrainOutcome]
    root: Path  # the run, the ensemble folder, or the run the background belongs to

    @property
    def members(self) -> list[str]:
        return [member_name(o.config.train.seed) for o in self.outcomes]


def train(req: TrainRequest, *, data_root: Path | None = None, download: bool = False,
          log: Callable[[str], None] = print, progress: TrainProgress | None = None,
          on_member: Callable[[TrainOutcome], None] | None = None) -> TrainResult:
    """Train what ``req`` asks for. Under torchrun every rank calls this with the same
    request (rank 0 writes; see :func:`~ood_audit.training.run.train_run`), and a user
    error, which every rank meets alike, is said by rank 0 alone."""
    try:
        return _train(req, data_root=data_root, download=download, log=log, progress=progress,
                      on_member=on_member)
    except UserError as exc:
        if dist_env()[0] != 0:
            quiet = SaidByRankZero(str(exc))
            quiet.exit_code = exc.exit_code  # 130 for Ctrl-C, as rank 0's
            raise quiet from None
        raise


def _train(req: TrainRequest, *, data_root, download, log, progress, on_member) -> TrainResult:
    common = dict(data_root=data_root, download=download, log=log, progress=progress)
    if req.background:
        rd = resolve_run(req.run if req.run is not None else req.out)
        overrides = {k: v for k, v in req.train.items() if k not in ("weight_decay",)}
        decay = req.train.get("weight_decay")
        outcome = train_background(
            rd, mu=DEFAULT_MU if req.mu is None else req.mu,
            weight_decay=DEFAULT_WEIGHT_DECAY if decay is None else decay,
            overrides=overrides, resume=req.resume, resume_epochs=req.train.get("epochs"),
            **common)
        return TrainResult("background", [outcome], rd.root)
    cfg = req.run_config()
    ensemble_resume = (req.resume and req.out is not None
                       and (Path(req.out) / ENSEMBLE_FILE).exists())
    if req.seeds is not None or ensemble_resume:
        seeds = parse_seeds(req.seeds) if req.seeds is not None else None
        outcomes = train_ensemble(None if req.resume else cfg, req.out, seeds, resume=req.resume,
                                  resume_epochs=req.train.get("epochs"), on_member=on_member,
                                  **common)
        return TrainResult("ensemble", outcomes, outcomes[0].run_dir.parent)
    outcome = train_run(cfg, req.out, resume=req.resume, resume_epochs=req.train.get("epochs"),
                        **common)
    return TrainResult("run", [outcome], RunDir(outcome.run_dir).root)
