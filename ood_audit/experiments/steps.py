"""The kinds of experiment step, as a table: for each, the library call behind it (the
same :mod:`ood_audit.commands` function the CLI command calls), what experiment.json
records of its result, the files it leaves, and the data sets it reads."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..commands.decompose import decompose
from ..commands.report import report
from ..commands.score import score
from ..commands.train import TrainResult
from ..config import REPORT_FORMATS, RunConfig, from_dict, load_yaml, parse_formats
from ..errors import UserError
from ..runs import ENSEMBLE_FILE, RunDir, refuse_if_locked
from ..training.ensemble import train_ensemble
from ..training.run import checkpoint_epoch, train_run
from .hooks import ExperimentHooks
from .plan import comparable_config, decompose_config, score_config
from .spec import Experiment, PlannedRun, Step


def _stored_config(rd: RunDir) -> RunConfig | None:
    try:
        return from_dict(RunConfig, load_yaml(rd.config), where=str(rd.config))
    except UserError:
        return None


def train_status(rd: RunDir, cfg: RunConfig) -> str:
    """``done``, ``resume`` (same config, epochs left) or ``new``; a UserError when the
    folder holds another run, which only ``--force`` (or another --out) may replace."""
    if not rd.config.exists():
        if rd.model.exists() or rd.train_state.exists():
            raise UserError(f"{rd.root} holds a run without config.yaml: rerun with --force "
                            "to retrain it, or pass another --out")
        return "new"
    stored = _stored_config(rd)
    # Epochs may grow (the run resumes and trains longer; config.yaml keeps its first value).
    if stored is None or comparable_config(stored, epochs=False) != comparable_config(cfg, epochs=False):
        have = comparable_config(stored, epochs=False) if stored else {}
        want = comparable_config(cfg, epochs=False)
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if "train" in diff:
            diff.remove("train")
            diff += [f"train.{k}" for k in sorted(want["train"])
                     if have.get("train", {}).get(k) != want["train"][k]]
        raise UserError(f"{rd.root} holds a run trained with another config ({', '.join(diff)} "
                        "differ): rerun with --force to retrain it, or pass another --out")
    trained = checkpoint_epoch(rd.model)
    if trained > cfg.train.epochs:
        raise UserError(f"{rd.root} is trained for {trained} epochs, more than the {cfg.train.epochs} "
                        "asked for: rerun with --force to retrain it, or pass another --out")
    return "done" if trained == cfg.train.epochs else "resume"


def run_status(run: PlannedRun) -> str:
    """:func:`train_status` of a run, or of an ensemble (``resume`` when half-trained)."""
    root = RunDir(run.root)
    if run.ensemble and (root.config.exists() or (root.root / "model.safetensors").exists()):
        raise UserError(f"{root.root} holds a single run, not an ensemble of seeds: rerun with "
                        "--force to retrain it, or pass another --out")
    if not run.ensemble and (root.root / "ensemble.json").exists():
        raise UserError(f"{root.root} holds an ensemble (ensemble.json), not a single run: rerun "
                        "with --force to retrain it, or pass another --out")
    found = {train_status(rd, cfg) for rd, cfg in run.members}
    return found.pop() if len(found) == 1 else "resume"


@dataclass
class Env:
    """Where a step runs: its experiment, how it is to be run, what it reports to."""

    exp: Experiment
    status: str  # new | resume
    force: bool
    data_root: Path | None
    download: bool
    hooks: ExperimentHooks


def _train(step: Step, env: Env) -> tuple[TrainResult, dict]:
    run, cfg = step.run, step.run.config
    if env.force and run.root.exists():  # redo from scratch
        refuse_if_locked(RunDir(run.root))
        shutil.rmtree(run.root)
    elif env.status == "new" and run.ensemble:  # killed before its first member's config
        (run.root / ENSEMBLE_FILE).unlink(missing_ok=True)
    common = dict(resume=env.status == "resume", resume_epochs=cfg.train.epochs,
                  data_root=env.data_root, download=env.download, log=env.hooks.log,
                  progress=env.hooks.train_progress())
    if run.ensemble:
        outcomes = train_ensemble(cfg.run_config(), run.root, list(cfg.seeds), **common)
        result = TrainResult("ensemble", outcomes, run.root)
    else:
        result = TrainResult("run", [train_run(cfg.run_config(), run.root, point_latest=False,
                                               **common)], run.root)
    return result, {"test_bpd": {str(o.run_dir): o.results[-1].test_bpd if o.results else None
                                 for o in result.outcomes}}


def _score(step: Step, env: Env):
    with env.hooks.score_progress() as progress:
        result = score(step.run.scored, score_config(env.exp, step.run), data_root=env.data_root,
                       download=env.download, notify=env.hooks.log, progress=progress)
    return result, {"mean_bpd": {f"{x.dataset}|{x.split}|{x.transform}": round(x.means["bpd"], 4)
                                 for x in result.sets}}


def _decompose(step: Step, env: Env):
    with env.hooks.score_progress() as progress:
        result = decompose(step.run.scored, decompose_config(env.exp, step.run),
                           data_root=env.data_root, download=env.download, progress=progress)
    return result, {}


def _report(step: Step, env: Env):
    result = report([run.scored for run in env.exp.runs], env.exp.report,
                    out=env.exp.report_dir, notify=env.hooks.log)
    return result, {"gates_passed": result.passed,
                    "gate_detail": "; ".join(g.detail for g in result.failed)}


def _decompose_outputs(step: Step, exp: Experiment) -> list[Path]:
    rd = step.run.scored
    return ([rd.decomposition] + ([rd.over_training] if exp.decompose.over_training else [])
            + ([rd.second_order] if exp.decompose.second_order else []))


def _score_data(step: Step, exp: Experiment) -> list[tuple[str, str]]:
    return [(step.run.config.data, "test"), *((name, "test") for name in exp.score.ood)]


@dataclass(frozen=True)
class StepKind:
    """``call(step, env) -> (result, record)``: the library call and what experiment.json
    keeps of it; ``outputs``: the files a complete step leaves; ``data``: the (data set,
    split) pairs it reads."""

    call: Callable[[Step, Env], tuple[object, dict]]
    outputs: Callable[[Step, Experiment], list[Path]]
    data: Callable[[Step, Experiment], list[tuple[str, str]]]
    skip_reason: str = "done with these inputs (experiment.json)"
    #: ``status(step) -> done | resume | new`` judged from the files (a train step's
    #: checkpoint); None: from experiment.json's fingerprint and ``outputs``
    status: Callable[[Step], str] | None = None


STEP_KINDS: dict[str, StepKind] = {
    "train": StepKind(_train, lambda step, exp: [],
                      lambda step, exp: [(step.run.config.data, "train")],
                      "trained to its last epoch with this config",
                      lambda step: run_status(step.run)),
    "score": StepKind(_score, lambda step, exp: [step.run.scored.scores], _score_data),
    "decompose": StepKind(_decompose, _decompose_outputs, lambda step, exp: []),
    "report": StepKind(_report, lambda step, exp: [exp.report_dir / REPORT_FORMATS[f]
                                                    for f in parse_formats(exp.report.formats)],
                       lambda step, exp: []),
}
