"""``train`` as a library call: resolve the config, load data, build, train, checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ..config import RunConfig, from_dict, load_yaml
from ..data import DATASETS, load_dataset
from ..errors import UserError
from ..models.registry import build_model, get_spec, resolve_model_config
from ..runs import RUNS_ROOT, RunDir, atomic_write_text, new_run_name, run_lock, set_latest
from .trainer import EpochResult, Trainer, TrainProgress, pick_device


@dataclasses.dataclass
class TrainOutcome:
    run_dir: Path
    config: RunConfig
    results: list[EpochResult]
    notes: list[str]
    n_params: int
    device: str


def load_run_config(path: Path) -> RunConfig:
    return from_dict(RunConfig, load_yaml(path), where=str(path))


def train_run(
    config: RunConfig,
    out: Path | None = None,
    *,
    resume: bool = False,
    resume_epochs: int | None = None,
    data_root: Path | None = None,
    download: bool = False,
    runs_root: Path = RUNS_ROOT,
    log: Callable[[str], None] = print,
    progress: TrainProgress | None = None,
) -> TrainOutcome:
    """Train ``config`` into run directory ``out`` (new), or continue it with ``resume``.

    A resumed run keeps its stored config; only ``resume_epochs`` (train longer) applies.
    """
    if resume:
        if out is None:
            raise UserError("--resume needs --out DIR: the run directory to continue")
        rd = RunDir(out)
        if not rd.config.exists() or not rd.train_state.exists():
            raise UserError(f"nothing to resume in {rd.root}: it has no config.yaml and "
                            "train_state.pt (start a new run without --resume)")
        config = load_run_config(rd.config)
        if resume_epochs is not None:
            config.train.epochs = resume_epochs
    else:
        rd = RunDir(out or runs_root / new_run_name(config.model, config.data))
        if rd.model.exists() or rd.train_state.exists():
            raise UserError(f"{rd.root} already holds a run: continue it with --resume, "
                            "or pass another --out")
    spec = get_spec(config.model)  # fail on a bad model or preset before loading data
    if config.preset not in spec.presets:
        raise UserError(f"model {config.model!r} has no preset {config.preset!r}; "
                        f"choose one of: {', '.join(spec.presets)}")
    if config.data not in DATASETS and not Path(config.data).exists():
        raise UserError(f"unknown data set {config.data!r}; choose one of: "
                        f"{', '.join(DATASETS)} or give a path to a .npy/.npz file or image folder")
    device = pick_device(config.train.device)
    with run_lock(rd, "ood-audit train"):
        train_set = load_dataset(config.data, "train", root=data_root, download=download,
                                 limit=config.train.limit)
        test_set = load_dataset(config.data, "test", root=data_root, download=download,
                                limit=config.train.test_limit)
        model_config, notes = resolve_model_config(
            config.model, config.preset, config.model_config, train_set.shape
        )
        for n in notes:
            log(n)
        torch.manual_seed(config.train.seed)  # weight init: same seed, same model
        model = build_model(config.model, model_config, train_set.shape).to(device)
        trainer = Trainer(model, config.model, model_config, config, rd, train_set, test_set,
                          device, progress=progress)
        if resume:
            trainer.load_state()
            log(f"resuming {rd.root} at epoch {trainer.state.epoch + 1}, "
                f"batch {trainer.state.batch + 1}")
        else:
            rd.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(rd.config, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
            trainer.data_init()
        set_latest(rd.root, runs_root)
        results = trainer.fit()
    n_params = sum(p.numel() for p in model.parameters())
    return TrainOutcome(rd.root, config, results, notes, n_params, str(device))
