"""``train`` as a library call: resolve the config, load data, build, train, checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ..checkpoint import checkpoint_arch, read_metadata
from ..config import RunConfig, from_dict, load_yaml
from ..data.registry import DATASETS, load_dataset
from ..device import pick_device
from ..distributed import DistContext, dist_env, init_distributed
from ..errors import UserError
from ..faults import keeping
from ..models.registry import MODELS, build_model, get_spec, resolve_model_config
from ..runs import RUNS_ROOT, RunDir, atomic_write_text, new_run_name, refuse_if_locked, run_lock, set_latest
from .trainer import EpochResult, Trainer, TrainProgress


@dataclasses.dataclass
class TrainOutcome:
    run_dir: Path
    config: RunConfig
    results: list[EpochResult]
    notes: list[str]
    n_params: int
    device: str
    world_size: int = 1  # processes (torchrun ranks) that trained it; batch size is global


def load_run_config(path: Path) -> RunConfig:
    """A run config from YAML; bad keys or values, model_config's too, name the file."""
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
    point_latest: bool = True,
    dist: DistContext | None = None,
) -> TrainOutcome:
    """Train ``config`` into run directory ``out`` (new), or continue it with ``resume``.

    A resumed run keeps its stored config; only ``resume_epochs`` (train longer) applies.
    ``point_latest=False`` leaves ``runs/latest`` alone (a background model is not a run
    that score/report should default to).

    Under ``torchrun`` (``WORLD_SIZE > 1``) every rank calls this with the same arguments:
    it joins the process group (or uses ``dist``, left open for the caller), rank 0 takes
    the run lock, checks and writes, the others train their slice of each global batch.
    """
    own = dist is None and dist_env()[1] > 1
    if own:
        dist = init_distributed(_device_name(config, out, resume))
    try:
        return _train_run(config, out, resume=resume, resume_epochs=resume_epochs,
                          data_root=data_root, download=download, runs_root=runs_root, log=log,
                          progress=progress, point_latest=point_latest,
                          dist=dist if dist is not None and dist.distributed else None)
    finally:
        if own:
            dist.close()


def _device_name(config: RunConfig | None, out: Path | None, resume: bool) -> str:
    """The device a resumed run trained on (its config.yaml), else the given config's."""
    if resume and out is not None and RunDir(out).config.exists():
        try:
            return load_run_config(RunDir(out).config).train.device
        except UserError:
            pass  # rank 0 says what is wrong with it
    return config.train.device if config is not None else "auto"


def _prepare(config: RunConfig | None, out: Path | None, resume: bool, resume_epochs: int | None,
             runs_root: Path, world: int, stack: contextlib.ExitStack) -> tuple[Path, RunConfig, bool]:
    """Rank 0's checks, then the run lock (held by ``stack``): (run dir, config, fresh)."""
    if resume:
        if out is None:
            raise UserError("--resume needs --out DIR: the run directory to continue")
        rd = RunDir(out)
        refuse_if_locked(rd)
        _check_resumable(rd)
        config = load_run_config(rd.config)
        _check_same_arch(rd, config)
        if "loss_scale" not in (load_yaml(rd.config).get("train") or {}):
            config.train.loss_scale = "nats_per_image"  # written before 0.2: keep its loss
        if resume_epochs is not None:
            config.train.epochs = resume_epochs
    else:
        rd = RunDir(out or runs_root / new_run_name(config.model, config.data))
        refuse_if_locked(rd)
        _check_new(rd)
    spec = get_spec(config.model)  # fail on a bad model or preset before loading data
    if config.preset not in spec.presets:
        raise UserError(f"model {config.model!r} has no preset {config.preset!r}; "
                        f"choose one of: {', '.join(spec.presets)}")
    if config.data not in DATASETS and not Path(config.data).exists():
        raise UserError(f"unknown data set {config.data!r}; choose one of: "
                        f"{', '.join(DATASETS)} or give a path to a .npy/.npz file or image folder")
    if config.train.batch_size % world:
        raise UserError(f"--batch-size {config.train.batch_size} is the global batch and must be "
                        f"divisible by the {world} ranks; pick a multiple of {world}")
    if world == 1:
        pick_device(config.train.device)  # under torchrun, init_distributed checked it
    stack.enter_context(run_lock(rd, "ood-audit train"))
    # Checked again under the lock: another train may have finished in between.
    if resume:
        _check_resumable(rd)
    else:
        _check_new(rd)
    remove_stale_temporaries(rd)
    return rd.root, config, not resume or not rd.train_state.exists()


def _train_run(config, out, *, resume, resume_epochs, data_root, download, runs_root, log,
               progress, point_latest, dist: DistContext | None) -> TrainOutcome:
    main = dist is None or dist.is_main
    world = dist.world if dist is not None else 1
    if not main:
        log = _quiet
    with contextlib.ExitStack() as stack:
        setup: object = None
        failure: Exception | None = None
        try:
            if main:
                setup = _prepare(config, out, resume, resume_epochs, runs_root, world, stack)
        except Exception as exc:  # noqa: BLE001 - a bad option or a read-only --out: all ranks learn it
            if dist is None:
                raise
            failure = exc
        if dist is not None:  # every rank fails, or goes on, with rank 0's verdict
            dist.agree(failure)
            setup = dist.broadcast_object(setup)
        root, config, fresh = setup
        rd = RunDir(root)
        # what a fault of the machine (a full disk...) keeps, read off the files when the
        # CLI makes its line (ood_audit.faults)
        stack.enter_context(keeping(lambda: train_kept(rd)))
        device = dist.device if dist is not None else pick_device(config.train.device)
        train_set = load_dataset(config.data, "train", root=data_root, download=download,
                                 limit=config.train.limit)
        test_set = load_dataset(config.data, "test", root=data_root, download=download,
                                limit=config.train.test_limit)
        model_config, notes = resolve_model_config(
            config.model, config.preset, config.model_config, train_set.shape
        )
        for n in notes:
            log(n)
        if world > 1:
            log(f"effective batch {config.train.batch_size} = {world} ranks x "
                f"{config.train.batch_size // world} (DistributedDataParallel, {dist.backend})")
        torch.manual_seed(config.train.seed)  # weight init: same seed, same model
        model = build_model(config.model, model_config, train_set.shape).to(device)
        apply_fast_paths(model, config.model, config.train.fast_path)
        trainer = Trainer(model, config.model, model_config, config, rd, train_set, test_set,
                          device, progress=progress, dist=dist)
        if not fresh:
            trainer.load_state()  # every rank reads it: --out must be on a shared file system
            log(f"resuming {rd.root} at epoch {trainer.state.epoch + 1}, "
                f"batch {trainer.state.batch + 1}")
        else:
            if resume:  # stopped before its first checkpoint: the same run from the start
                log(f"{rd.root} stopped before its first epoch ended: training it from the "
                    "start with its config.yaml")
            if main:
                atomic_write_text(rd.config, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
            # Every rank inits on the same seeded batch; DDP then broadcasts rank 0's result.
            trainer.data_init()
        if point_latest and main:
            set_latest(rd.root, runs_root)
        results = trainer.fit()
    n_params = sum(p.numel() for p in model.parameters())
    return TrainOutcome(rd.root, config, results, notes, n_params, str(device), world)


def apply_fast_paths(model, model_name: str, names: list[str]) -> None:
    """Turn on ``names`` (TrainConfig.fast_path) on ``model``, already on its device (the
    fast paths check the device); a UserError for a model without fast paths."""
    if not names:
        return
    if not hasattr(model, "set_fast_path"):
        raise UserError(f"model {model_name!r} has no fast paths ({', '.join(names)} given); "
                        "they apply to glow only: drop the flag(s)")
    for name in names:
        model.set_fast_path(name, True)


def train_kept(rd: RunDir) -> str:
    """What a run that stopped on a fault keeps, and how to go on: its checkpoint and
    train_state.pt are written atomically, so they are the last complete epoch's."""
    epoch = checkpoint_epoch(rd.model)
    go_on = f"continue with ood-audit train --resume --out {rd.root}"
    if rd.train_state.exists():
        if epoch:
            return f"last complete checkpoint: epoch {epoch} ({rd.model}); {go_on}"
        return f"no epoch finished; the state saved mid-epoch is kept; {go_on}"
    if epoch > 1:  # a later epoch's weights without their state: _check_resumable refuses
        return f"last complete checkpoint: epoch {epoch} ({rd.model}), which can be scored"
    if rd.config.exists():  # a resume starts over, the same seed giving the same run
        return f"no complete training state yet; {go_on} (it starts over)"
    return f"nothing was written in {rd.root}"


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def _check_new(rd: RunDir) -> None:
    if rd.root.exists() and not rd.root.is_dir():
        raise UserError(f"--out {rd.root} is a file, not a run directory: name a folder")
    if rd.model.exists() or rd.train_state.exists():
        raise UserError(f"{rd.root} already holds a run: continue it with --resume, "
                        "or pass another --out")


def _check_resumable(rd: RunDir) -> None:
    """A run resumes from train_state.pt, or restarts from scratch when it was killed
    before its first train_state.pt (the same seed gives the same trajectory). Weights of
    a later epoch without a state cannot continue exactly."""
    if not rd.config.exists():
        raise UserError(f"nothing to resume in {rd.root}: it has no config.yaml "
                        "(start a new run without --resume)")
    if not rd.train_state.exists() and checkpoint_epoch(rd.model) > 1:
        raise UserError(f"{rd.root} has model.safetensors but no train_state.pt, so it cannot "
                        "continue exactly: score it as it is, or start a new run")


def _check_same_arch(rd: RunDir, config: RunConfig) -> None:
    """A run whose checkpoint predates today's architecture of its model loads for
    scoring (upgraded), but its optimizer state belongs to the old layers: no resume."""
    if config.model not in MODELS or not rd.model.exists():
        return
    try:
        arch = checkpoint_arch(read_metadata(rd.model))
    except UserError:
        return  # the resume itself says what is wrong with the file
    spec = get_spec(config.model)
    if arch != spec.arch:
        raise UserError(f"{rd.root} was trained with an older {config.model} architecture "
                        f"({arch}; this ood-audit trains {spec.arch}): it scores as it is "
                        "(ood-audit score) but cannot be resumed; start a new run")


def checkpoint_epoch(path: Path) -> int:
    """The epoch in a checkpoint's header; 0 when there is none or it is unreadable.

    A train killed between writing epoch 1's weights and its train_state.pt leaves
    ``model.safetensors`` (epoch 1) alone: restarting from scratch rewrites the same one.
    """
    if not path.exists():
        return 0
    try:
        return int(read_metadata(path).get("epoch", 0))
    except (UserError, ValueError):
        return 0


#: Files only ``train`` writes in a run directory (under its lock).
_TRAIN_OUTPUTS = ("model.safetensors", "train_state.pt", "metrics.parquet", "config.yaml")


def remove_stale_temporaries(rd: RunDir) -> None:
    """Delete half-written files a killed train left behind (``.model.safetensors.*.tmp``,
    ``checkpoints/.epoch-*.tmp``...). Only call under the run's lock: no train is writing
    them, and other commands never write these names."""
    stale = [p for name in _TRAIN_OUTPUTS for p in rd.root.glob(f".{name}.*.tmp")]
    stale += list(rd.root.glob(".model.safetensors.link"))
    if rd.checkpoints.is_dir():
        stale += list(rd.checkpoints.glob(".epoch-*.safetensors.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
