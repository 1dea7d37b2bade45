"""``ood-audit train`` as one library call: a run, an ensemble of seeds, or the
background model of a run's likelihood ratio.

:class:`TrainRequest` is what the command is asked, as given (None: not given); its
checks say which options go together. :func:`train` builds the run's config
(:class:`~ood_audit.config.RunConfig`: the ``--config`` file, then the flags) and calls
:func:`~ood_audit.training.run.train_run`, :func:`~ood_audit.training.ensemble.train_ensemble`
or :func:`~ood_audit.training.background.train_background`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, TrainConfig, from_dict, load_yaml
from ..errors import SaidByRankZero, UserError
from ..runs import ENSEMBLE_FILE, RunDir, resolve_run
from ..torchrun_env import dist_env
from ..training.background import DEFAULT_MU, DEFAULT_WEIGHT_DECAY, train_background
from ..training.ensemble import member_name, parse_seeds, train_ensemble
from ..training.run import TrainOutcome, train_run
from ..training.trainer import TrainProgress


@dataclass
class TrainRequest:
    """The options of ``ood-audit train`` as given; None (or empty) where not given."""

    config_file: Path | None = None  # --config: a RunConfig YAML (examples/demo.yaml)
    model: str | None = None
    data: str | None = None
    preset: str | None = None
    #: TrainConfig fields given as flags (epochs, batch_size, lr, seed, limit, ...)
    train: dict[str, object] = field(default_factory=dict)
    fast_path: list[str] = field(default_factory=list)  # fast-path flags turned on
    out: Path | None = None
    resume: bool = False
    seeds: str | None = None  # "0,1,2": one run per seed
    background: bool = False
    mu: float | None = None  # --background: pixel perturbation rate
    run: Path | None = None  # --background: the run to add a background model to

    def __post_init__(self) -> None:
        self.train = {k: v for k, v in self.train.items() if v is not None}
        if self.seeds is not None and self.background:
            raise UserError("--seeds cannot be combined with --background: train the ensemble, "
                            "then a background model per member with --background --run OUT/seed-<s>")
        if self.background:
            given = [flag for flag, value in (("--model", self.model), ("--data", self.data),
                                              ("--preset", self.preset),
                                              ("--config", self.config_file)) if value is not None]
            if given:
                raise UserError(f"{', '.join(given)} cannot be combined with --background: the "
                                "background model uses the run's own model, preset and data")
            if (self.run is not None and self.out is not None
                    and Path(self.run).resolve() != Path(self.out).resolve()):
                raise UserError("--run and --out name different runs; with --background give the "
                                "run to add a background model to once (--run DIR)")
            return
        if self.seeds is not None and "seed" in self.train:
            raise UserError("--seeds and --seed conflict: --seeds 0,1,2 trains one run per seed, "
                            "--seed S one run")
        for flag, value in (("--mu", self.mu), ("--run", self.run)):
            if value is not None:
                raise UserError(f"{flag} applies to --background only (the likelihood-ratio "
                                "background model); --out names the run directory")

    def run_config(self) -> RunConfig:
        """The ``--config`` file (else the defaults), then the flags over it."""
        raw = load_yaml(self.config_file) if self.config_file else {}
        flags = {k: getattr(self, k) for k in ("model", "data", "preset")
                 if getattr(self, k) is not None}
        where = str(self.config_file) if self.config_file else "train options"
        cfg = from_dict(RunConfig, {**raw, **flags}, where=where)
        overrides = dict(self.train)
        if self.fast_path:  # added to the config file's fast_path, if any
            overrides["fast_path"] = [*cfg.train.fast_path, *self.fast_path]
        if overrides:
            merged = {**dataclasses.asdict(cfg.train), **overrides}
            cfg.train = from_dict(TrainConfig, merged, where="train options")
        return cfg


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
