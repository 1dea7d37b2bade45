"""``train --seeds 0,1,2``: an ensemble of runs that differ only in their seed.

Layout (agreed with ensemble scoring)::

    DIR/seed-0/, DIR/seed-1/, ...   each a normal run directory, its seed in config.yaml
    DIR/ensemble.json               {"members": ["seed-0", ...], "seeds": [0, ...], ...}

``members``/``seeds`` list the members that finished training (relative paths), so a
reader never meets a half-trained member; ``planned_seeds`` lists them all and
``training`` names the member in progress (null when none). The file is written
atomically when the first member starts (so a partial ensemble is visible) and again as
each member starts and finishes. Members train one after another in one invocation;
``--resume`` continues the unfinished ones. Ensembles of generative models do not close
the OOD gap (Nalisnick et al. 2019, section 6); WAIC over them is one remedy tried.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from pathlib import Path

from ..config import MAX_SEED, RunConfig
from ..distributed import DistContext, dist_env, init_distributed
from ..errors import UserError
from ..runs import ENSEMBLE_FILE, RUNS_ROOT, RunDir, atomic_write_text, new_run_name, run_lock, set_latest
from .run import TrainOutcome, load_run_config, train_run
from .trainer import TrainProgress


def member_name(seed: int) -> str:
    return f"seed-{seed}"


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a bad, repeated or out-of-range seed is a UserError."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) > MAX_SEED:
            raise UserError(f"--seeds {text!r}: give seeds as integers 0..{MAX_SEED} separated "
                            "by commas, e.g. --seeds 0,1,2,3,4")
        if int(part) in seeds:
            raise UserError(f"--seeds {text!r} repeats seed {part}: each member needs its own")
        seeds.append(int(part))
    return seeds


def read_ensemble(root: Path) -> dict:
    """DIR/ensemble.json as a dict, or a UserError saying why it cannot be used."""
    path = Path(root) / ENSEMBLE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{root} holds no {ENSEMBLE_FILE}: not an ensemble trained with "
                        "train --seeds") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("planned_seeds", data.get("seeds")), list):
        raise UserError(f"{path} is not an ensemble file (no seeds list)")
    return data


def _write(root: Path, planned: list[int], done: list[int], training: int | None) -> None:
    atomic_write_text(root / ENSEMBLE_FILE, json.dumps({
        "members": [member_name(s) for s in done],
        "seeds": done,
        "planned_seeds": planned,
        "training": None if training is None else member_name(training),
    }, indent=2) + "\n")


def train_ensemble(
    config: RunConfig | None, out: Path | None, seeds: list[int] | None, *, resume: bool = False,
    resume_epochs: int | None = None, data_root: Path | None = None, download: bool = False,
    runs_root: Path = RUNS_ROOT, log: Callable[[str], None] = print,
    progress: TrainProgress | None = None,
    on_member: Callable[[TrainOutcome], None] | None = None,
) -> list[TrainOutcome]:
    """Train one run per seed into ``out/seed-<s>``, one after another.

    Each member is exactly ``train --seed s`` with ``config`` (same weights as a separate
    run). ``resume``: continue the members of ``out`` (``seeds`` default to the planned
    ones) — finished ones return at once, started ones resume, missing ones start from the
    first member's config with their own seed. Under torchrun one process group serves all.
    """
    own = dist_env()[1] > 1
    dist = init_distributed(config.train.device if config is not None else "auto") if own else None
    try:
        return _train_all(config, out, seeds, resume, resume_epochs, data_root, download,
                          runs_root, log, progress, on_member, dist)
    finally:
        if dist is not None:
            dist.close()


def _train_all(config, out, seeds, resume, resume_epochs, data_root, download, runs_root, log,
               progress, on_member, dist: DistContext | None) -> list[TrainOutcome]:
    main = dist is None or dist.is_main
    if resume:
        if out is None:
            raise UserError("--resume needs --out DIR: the ensemble directory to continue")
        root = Path(out)
        planned = seeds if seeds is not None else read_ensemble(root)["planned_seeds"]
    else:
        if seeds is None or config is None:
            raise UserError("an ensemble needs --seeds, e.g. --seeds 0,1,2")
        planned = seeds
        root = Path(out) if out is not None else runs_root / new_run_name(config.model, config.data)
        taken = (root / ENSEMBLE_FILE).exists()
        if dist is not None:  # rank 0's time-stamped name and verdict, before it writes the file
            root, taken = dist.broadcast_object((root, taken))
        if taken:
            raise UserError(f"{root} already holds an ensemble: continue it with --resume --out "
                            f"{root}, or pass another --out")
    done: list[int] = []
    outcomes = []
    with run_lock(RunDir(root), "ood-audit train --seeds") if main else contextlib.nullcontext():
        for seed in planned:
            member = RunDir(root / member_name(seed))
            if main:
                _write(root, planned, done, seed)
            log(f"ensemble member {member_name(seed)} ({len(done) + 1}/{len(planned)}) -> {member.root}")
            if resume and member.config.exists():
                outcome = train_run(None, member.root, resume=True, resume_epochs=resume_epochs,
                                    data_root=data_root, download=download, runs_root=runs_root,
                                    log=log, progress=progress, point_latest=False, dist=dist)
            else:
                cfg = copy.deepcopy(config) if not resume else _template(root, planned)
                cfg.train.seed = seed
                if resume and resume_epochs is not None:
                    cfg.train.epochs = resume_epochs
                outcome = train_run(cfg, member.root, data_root=data_root, download=download,
                                    runs_root=runs_root, log=log, progress=progress,
                                    point_latest=False, dist=dist)
            done.append(seed)
            outcomes.append(outcome)
            if on_member is not None:
                on_member(outcome)
        if main:
            _write(root, planned, done, None)
            # score/report default to member 0; the others join it with score --member
            set_latest(root / member_name(planned[0]), runs_root)
    return outcomes


def _template(root: Path, planned: list[int]) -> RunConfig:
    """The config of the first member that has one: a new member copies it but the seed."""
    for seed in planned:
        path = root / member_name(seed) / "config.yaml"
        if path.exists():
            return load_run_config(path)
    raise UserError(f"{root} has no member with a config.yaml to continue from: start the "
                    "ensemble anew without --resume")
