"""The background model of the likelihood-ratio detector (Ren et al., NeurIPS 2019).

Ren et al. train a second model of the same family on the same data with each pixel
replaced, with probability ``mu``, by a uniform random value (and L2 weight decay), so
that it learns the population-level "background" statistics (smooth regions, black
borders) but not the semantics. The detector is then

    LLR(x) = log p_model(x) - log p_background(x)

(see :mod:`ood_audit.analysis.detectors`). Here the background lives inside the run it
belongs to, as a nested run directory ``RUN/background/`` with its own config.yaml
(``train.perturb_mu`` records mu, ``train.weight_decay`` the L2 coefficient),
checkpoints and metrics; ``ood-audit score RUN`` finds it there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..config import from_dict
from ..errors import UserError
from ..runs import BACKGROUND_DIR, RUNS_ROOT, RunDir
from .run import TrainOutcome, load_run_config, train_run
from .trainer import TrainProgress

DEFAULT_MU = 0.1  # Ren et al. tune mu in [0.1, 0.2] on held-out data
DEFAULT_WEIGHT_DECAY = 1e-4  # L2 coefficient (Adam's coupled weight decay = an L2 penalty)


def background_dir(run: RunDir | Path) -> RunDir:
    """``RUN/background``: where a run's background model lives."""
    return (run if isinstance(run, RunDir) else RunDir(Path(run))).background


def train_background(
    run: RunDir, *, mu: float = DEFAULT_MU, weight_decay: float = DEFAULT_WEIGHT_DECAY,
    overrides: dict | None = None, resume: bool = False, resume_epochs: int | None = None,
    data_root: Path | None = None, download: bool = False, runs_root: Path = RUNS_ROOT,
    log: Callable[[str], None] = print, progress: TrainProgress | None = None,
) -> TrainOutcome:
    """Train (or ``resume``) the background model of ``run`` into ``RUN/background``.

    The background copies the run's model family, preset, model config, data and
    training options (``overrides`` replace train options, e.g. ``{"epochs": 1}``), adds
    the perturbation rate ``mu`` and the L2 coefficient ``weight_decay``, keeps only its
    last checkpoint, and leaves ``runs/latest`` pointing where it was.
    """
    if not run.config.exists():
        raise UserError(f"{run.root} holds no config.yaml: name a run trained with "
                        "ood-audit train (--run DIR)")
    if run.root.name == BACKGROUND_DIR and (run.root.parent / "config.yaml").exists():
        raise UserError(f"{run.root} is itself a background model; name its parent run")
    bg = background_dir(run)
    if resume:
        return train_run(None, bg.root, resume=True, resume_epochs=resume_epochs,
                         data_root=data_root, download=download, runs_root=runs_root,
                         log=log, progress=progress, point_latest=False)
    if bg.model.exists() or bg.train_state.exists():
        raise UserError(f"{run.root} already has a background model in {bg.root}: continue it "
                        "with --background --resume, or delete that folder to retrain")
    cfg = load_run_config(run.config)
    train = {**dataclasses.asdict(cfg.train), **(overrides or {}),
             "perturb_mu": mu, "weight_decay": weight_decay, "keep_checkpoints": "last"}
    cfg.train = from_dict(type(cfg.train), train, where="background train options")
    if cfg.train.perturb_mu <= 0:
        raise UserError("--mu must be positive for a background model (Ren et al. use 0.1-0.2)")
    log(f"background model for {run.root}: {cfg.model} {cfg.preset} on {cfg.data}, "
        f"pixels perturbed with rate mu={mu:g}, L2 weight decay {weight_decay:g}")
    return train_run(cfg, bg.root, data_root=data_root, download=download, runs_root=runs_root,
                     log=log, progress=progress, point_latest=False)
