"""An experiment as steps (train, score, decompose, report), each with its equivalent CLI command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path

import yaml

from ..config import DecomposeConfig, RunConfig, ScoreConfig, TrainConfig, to_dict
from ..runs import RunDir
from .spec import Experiment, Step


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: RunConfig.train fields that ``ood-audit train`` has a flag for.
_TRAIN_FLAGS = ("epochs", "batch_size", "lr", "seed", "limit", "keep_checkpoints",
                "weight_decay", "device")


def train_argv(rd: RunDir, cfg: RunConfig, seeds: list | None = None) -> tuple[list[str], str]:
    """``ood-audit train`` for ``cfg``: flags when they say it all, else a --config file
    written by a shell here-document (the returned prelude)."""
    default = TrainConfig()
    if seeds:  # train --seeds sets each member's seed
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=default.seed))
        rest = ["--seeds", ",".join(map(str, seeds))]
        argv, prelude = train_argv(rd, cfg)
        return argv[:-2] + rest + argv[-2:], prelude
    rest = {k: v for k, v in to_dict(cfg.train).items() if k not in _TRAIN_FLAGS}
    preset = to_dict(RunConfig(model=cfg.model, preset=cfg.preset).model_config)
    changed = {k: v for k, v in to_dict(cfg.model_config).items() if v != preset[k]}
    if changed or rest != {k: v for k, v in to_dict(default).items() if k in rest}:
        conf = rd.root.parent / f"{rd.root.name}.train.yaml"
        # Only what differs from the defaults: the file reads like examples/demo.yaml.
        short = {"model": cfg.model, "preset": cfg.preset, "data": cfg.data,
                 **({"model_config": changed} if changed else {}),
                 "train": {k: v for k, v in to_dict(cfg.train).items() if v != getattr(default, k)}}
        text = yaml.safe_dump(short, sort_keys=False)
        prelude = (f"mkdir -p {shlex.quote(str(conf.parent))}\n"
                   f"cat > {shlex.quote(str(conf))} <<'EOF'\n{text}EOF\n")
        return ["ood-audit", "train", "--config", str(conf), "--out", str(rd.root)], prelude
    argv = ["ood-audit", "train", "--model", cfg.model, "--data", cfg.data, "--preset", cfg.preset]
    for key in _TRAIN_FLAGS:
        value = getattr(cfg.train, key)
        if value is not None and value != getattr(default, key):
            argv += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return argv + ["--out", str(rd.root)], ""


#: List fields of the command configs, and the option given once per item.
_REPEATED = {"ood": "--ood", "transforms": "--transform", "detectors": "--detector",
             "members": "--member", "gates": "--gate"}
#: Fields whose option is not ``--field-name``; None: not an option of the command.
_RENAMED = {"formats": "--format", "out": None}


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def option_argv(cfg) -> list[str]:
    """The options that give the command config ``cfg``: every field that differs from
    its default, as ``--field-name VALUE`` (a flag for a bool, repeated for a list, one
    flag per fast path), so the defaults are stated only in the config class."""
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = _RENAMED.get(f.name, "--" + f.name.replace("_", "-"))
        if value == _default(f) or flag is None:
            continue
        if f.name == "fast_path":
            argv += ["--" + name.replace("_", "-") for name in value]
        elif f.name in _REPEATED:
            argv += [x for item in value for x in (_REPEATED[f.name], str(item))]
        elif isinstance(value, bool):
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def score_config(exp: Experiment, run) -> ScoreConfig:
    """The experiment's score section for one run: on the device the run trains on."""
    return dataclasses.replace(exp.score, device=run.config.train.device)


def decompose_config(exp: Experiment, run) -> DecomposeConfig:
    return dataclasses.replace(exp.decompose, device=run.config.train.device)


def plan(exp: Experiment, data_root: Path | None = None) -> list[Step]:
    """Every step of the experiment in order, with its CLI equivalent and fingerprint."""
    extra = ["--data-root", str(data_root)] if data_root is not None else []
    steps: list[Step] = []
    for run in exp.runs:
        argv, prelude = train_argv(run.scored, run.config.run_config(), run.config.seeds)
        steps.append(Step("train", f"train:{run.root}", argv + extra, run,
                          _digest([comparable_config(cfg) for _, cfg in run.members]), prelude))
    for run in exp.runs:
        rd, cfg = run.scored, score_config(exp, run)
        argv = ["ood-audit", "score", str(rd.root), *option_argv(cfg)]
        steps.append(Step("score", f"score:{rd.root}", argv + extra, run,
                          _digest(to_dict(exp.score), [str(m.root) for m, _ in run.members])))
    for run in exp.runs:
        rd, cfg = run.scored, decompose_config(exp, run)
        argv = ["ood-audit", "decompose", str(rd.root), *option_argv(cfg)]
        steps.append(Step("decompose", f"decompose:{rd.root}", argv + extra, run,
                          _digest(to_dict(exp.decompose))))
    argv = ["ood-audit", "report", *(str(run.scored.root) for run in exp.runs),
            "--out", str(exp.report_dir), *option_argv(exp.report)]
    steps.append(Step("report", "report", argv, None,
                      _digest(to_dict(exp.report), [str(run.scored.root) for run in exp.runs])))
    return steps


def comparable_config(cfg: RunConfig, epochs: bool = True) -> dict:
    """The config as stored in config.yaml, minus the device (where it ran, not what)."""
    data = to_dict(cfg)
    data["train"].pop("device", None)
    if not epochs:
        data["train"].pop("epochs", None)
    return data


