"""An experiment as steps (train, score, decompose, report), each with its equivalent CLI command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path

import yaml

from ..config import RunConfig, TrainConfig, to_dict
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
    if cfg.model_config or rest != {k: v for k, v in to_dict(default).items() if k in rest}:
        conf = rd.root.parent / f"{rd.root.name}.train.yaml"
        # Only what differs from the defaults: the file reads like examples/demo.yaml.
        short = {"model": cfg.model, "preset": cfg.preset, "data": cfg.data,
                 **({"model_config": cfg.model_config} if cfg.model_config else {}),
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


def plan(exp: Experiment, data_root: Path | None = None) -> list[Step]:
    """Every step of the experiment in order, with its CLI equivalent and fingerprint."""
    s, d, r = exp.score, exp.decompose, exp.report
    extra = ["--data-root", str(data_root)] if data_root is not None else []
    steps: list[Step] = []
    for run in exp.runs:
        argv, prelude = train_argv(run.scored, run.config.run_config(), run.config.seeds)
        steps.append(Step("train", f"train:{run.root}", argv + extra, run,
                          _digest([comparable_config(cfg) for _, cfg in run.members]), prelude))
    for run in exp.runs:
        rd = run.scored
        argv = ["ood-audit", "score", "--run", str(rd.root)]
        for name in s.ood:
            argv += ["--ood", name]
        if s.limit is not None:
            argv += ["--limit", str(s.limit)]
        argv += ["--train-limit", str(s.train_limit), "--batch-size", str(s.batch_size),
                 "--seed", str(s.seed)]
        argv += ["--held-out"] if s.held_out else []
        for t in s.transforms:
            argv += ["--transform", t]
        for det in s.detectors or []:
            argv += ["--detector", det]
        if s.iw_samples is not None:
            argv += ["--iw-samples", str(s.iw_samples)]
        steps.append(Step("score", f"score:{rd.root}", argv + extra, run,
                          _digest(to_dict(s), [str(m.root) for m, _ in run.members])))
    so = ["--second-order", "--second-order-limit", str(d.second_order_limit),
          "--second-order-batch", str(d.second_order_batch),
          "--second-order-center", d.second_order_center] if d.second_order else []
    for run in exp.runs:
        rd = run.scored
        argv = ["ood-audit", "decompose", "--run", str(rd.root)]
        if d.over_training:
            argv += ["--over-training", "--over-training-limit", str(d.over_training_limit)]
        argv += so
        steps.append(Step("decompose", f"decompose:{rd.root}", argv + extra, run,
                          _digest(to_dict(d))))
    argv = ["ood-audit", "report", *(str(run.scored.root) for run in exp.runs),
            "--out", str(exp.report_dir), "--format", r.formats, "--n-boot", str(r.n_boot),
            "--seed", str(r.seed)]
    for gate in r.gates:
        argv += ["--gate", gate]
    steps.append(Step("report", "report", argv, None,
                      _digest(to_dict(r), [str(run.scored.root) for run in exp.runs])))
    return steps


def comparable_config(cfg: RunConfig, epochs: bool = True) -> dict:
    """The config as stored in config.yaml, minus the device (where it ran, not what)."""
    data = to_dict(cfg)
    data["train"].pop("device", None)
    if not epochs:
        data["train"].pop("epochs", None)
    return data


