"""Running an experiment's steps: statuses, skipping what is complete, the state file."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, from_dict, load_yaml
from ..errors import UserError
from ..faults import keeping
from ..runs import RunDir, atomic_write_text, run_lock
from .plan import comparable_config, plan
from .spec import STATE_FILE, Experiment, PlannedRun, Step


class ExperimentHooks:
    """What the CLI shows while an experiment runs; the defaults stay silent."""

    def log(self, message: str) -> None:
        """A one-line notice."""

    def step_start(self, step: Step, index: int, total: int, action: str) -> None:
        """Step ``index`` (1-based) of ``total`` starts; ``action`` says how (resume...)."""

    def step_skip(self, step: Step, index: int, total: int, why: str) -> None:
        """Step ``index`` is complete already and is skipped."""

    def step_end(self, step: Step, seconds: float, result: object) -> None:
        """A step finished; ``result`` is what its library call returned."""

    def train_progress(self):
        """A :class:`~ood_audit.training.trainer.TrainProgress` for a train step, or None."""
        return None

    def score_progress(self):
        """A context manager yielding a ScoreProgress (or None) for score/over-training."""
        import contextlib

        return contextlib.nullcontext(None)


@dataclass
class ExperimentResult:
    out: Path
    seconds: float
    ran: list[str]
    skipped: list[str]
    gates_passed: bool = True
    gate_detail: str = ""
    report_files: list[str] = field(default_factory=list)


def _stored_config(rd: RunDir) -> RunConfig | None:
    try:
        return from_dict(RunConfig, load_yaml(rd.config), where=str(rd.config))
    except UserError:
        return None


def train_status(rd: RunDir, cfg: RunConfig) -> str:
    """``done``, ``resume`` (same config, epochs left) or ``new``; a UserError when the
    folder holds another run, which only ``--force`` (or another --out) may replace."""
    from ..training.run import _checkpoint_epoch

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
    trained = _checkpoint_epoch(rd.model)
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


def _outputs(step: Step, exp: Experiment) -> list[Path]:
    if step.kind == "score":
        return [step.run.scored.scores]
    if step.kind == "decompose":
        rd = step.run.scored
        return ([rd.decomposition] + ([rd.over_training] if exp.decompose.over_training else [])
                + ([rd.second_order] if exp.decompose.second_order else []))
    from ..report.build import FORMAT_FILES, parse_formats

    return [exp.report_dir / FORMAT_FILES[f] for f in parse_formats(exp.report.formats)]


def statuses(exp: Experiment, steps: list[Step], force: bool = False) -> list[str]:
    """Per step: ``done`` (skip), ``new``, or ``resume`` (a train step left half-way)."""
    state = read_state(exp.out).get("steps", {})
    out: list[str] = []
    redone: set[str] = set()  # names of runs with a step to redo: their later steps follow
    for step in steps:
        if step.kind == "train":
            status = "new" if force else run_status(step.run)
        else:
            recorded = state.get(step.id, {}).get("fingerprint")
            upstream = bool(redone) if step.run is None else step.run.name in redone
            fresh = recorded == step.fingerprint and all(p.exists() for p in _outputs(step, exp))
            status = "done" if fresh and not upstream and not force else "new"
        if status != "done" and step.run is not None:
            redone.add(step.run.name)
        out.append(status)
    return out


def read_state(out: Path) -> dict:
    path = Path(out) / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(exp: Experiment, step: Step, record: dict) -> None:
    state = read_state(exp.out)
    state.update(experiment=exp.name, source=str(exp.source), variant=exp.variant)
    state.setdefault("steps", {})[step.id] = {"fingerprint": step.fingerprint, "command": step.command(),
                                              **record}
    atomic_write_text(exp.out / STATE_FILE, json.dumps(state, indent=2) + "\n")


def check_data(exp: Experiment, steps: list[Step], status: list[str], *,
               data_root: Path | None, download: bool) -> None:
    """Fail before any work when a data set a pending step needs is missing: the data
    registry's one-line error names the files expected and where."""
    from ..data.registry import DATASETS, load_dataset

    if download:
        return  # the steps fetch what is missing
    wanted: dict[tuple[str, str], None] = {}
    for step, st in zip(steps, status, strict=True):
        if st == "done":
            continue
        if step.kind == "train":
            wanted[step.run.config.data, "train"] = None
        elif step.kind == "score":
            wanted[step.run.config.data, "test"] = None
            for name in exp.score.ood:
                wanted[name, "test"] = None
    for name, split in wanted:
        spec = DATASETS.get(name)
        if spec is not None and spec.shape is None:
            continue  # synthetic: made on the fly in the model's shape
        load_dataset(name, split, root=data_root, limit=1)


def run_experiment(exp: Experiment, *, force: bool = False, data_root: Path | None = None,
                   download: bool = False, hooks: ExperimentHooks | None = None) -> ExperimentResult:
    """Run every step not yet complete, in order; see the module docstring."""
    hooks = hooks or ExperimentHooks()
    steps = plan(exp, data_root)
    start = time.perf_counter()
    result = ExperimentResult(exp.out, 0.0, [], [])
    # Missing data fails before anything is written (the lock would create the folder).
    check_data(exp, steps, statuses(exp, steps, force), data_root=data_root, download=download)
    with run_lock(RunDir(exp.out), "ood-audit run"):
        status = statuses(exp, steps, force)
        for i, (step, st) in enumerate(zip(steps, status, strict=True), 1):
            if st == "done":
                hooks.step_skip(step, i, len(steps), _skip_reason(step))
                result.skipped.append(step.id)
                if step.kind == "report":
                    rec = read_state(exp.out)["steps"][step.id]
                    result.gates_passed, result.gate_detail = rec["gates_passed"], rec["gate_detail"]
                    result.report_files = [str(p) for p in _outputs(step, exp)]
                continue
            hooks.step_start(step, i, len(steps), st)
            t0 = time.perf_counter()
            # a fault of the machine (a full disk...) keeps the steps done before this one
            with keeping(f"the steps before this {step.kind} step are done ({exp.out / STATE_FILE}); "
                         "the same ood-audit run continues from it"):
                value, record = _execute(exp, step, st, force=force, data_root=data_root,
                                         download=download, hooks=hooks)
            seconds = time.perf_counter() - t0
            _write_state(exp, step, {"seconds": round(seconds, 1), **record})
            result.ran.append(step.id)
            if step.kind == "report":
                result.gates_passed, result.gate_detail = value.passed, record["gate_detail"]
                result.report_files = [str(p) for p in value.files.values()]
            hooks.step_end(step, seconds, value)
    result.seconds = time.perf_counter() - start
    return result


def _skip_reason(step: Step) -> str:
    if step.kind == "train":
        return "trained to its last epoch with this config"
    return "done with these inputs (experiment.json)"


def _execute(exp: Experiment, step: Step, status: str, *, force: bool, data_root: Path | None,
             download: bool, hooks: ExperimentHooks) -> tuple[object, dict]:
    """Call the library function behind ``step``; returns its value and what to record."""
    from ..runs import refuse_if_locked

    if step.kind == "train":
        from ..training.run import train_run

        run, cfg = step.run, step.run.config
        if force and run.root.exists():  # redo from scratch
            refuse_if_locked(RunDir(run.root))
            shutil.rmtree(run.root)
        elif status == "new" and run.ensemble:  # killed before its first member's config
            (run.root / "ensemble.json").unlink(missing_ok=True)
        common = dict(resume=status == "resume", resume_epochs=cfg.train.epochs, data_root=data_root,
                      download=download, log=hooks.log, progress=hooks.train_progress())
        if run.ensemble:
            from ..training.ensemble import train_ensemble

            outcomes = train_ensemble(cfg.run_config(), run.root, list(cfg.seeds), **common)
        else:
            outcomes = [train_run(cfg.run_config(), run.root, point_latest=False, **common)]
        return outcomes, {"test_bpd": {str(o.run_dir): o.results[-1].test_bpd if o.results else None
                                       for o in outcomes}}
    rd = step.run.scored if step.run is not None else None
    device = step.run.config.train.device if step.run is not None else "auto"
    if step.kind == "score":
        from ..scoring.scorer import score_run

        s = exp.score
        with run_lock(rd, "ood-audit score"), hooks.score_progress() as progress:
            summaries = score_run(
                rd, list(s.ood), root=data_root, download=download, limit=s.limit,
                train_limit=s.train_limit, batch_size=s.batch_size, device=device, seed=s.seed,
                notify=hooks.log, progress=progress,
                options={"iw_samples": s.iw_samples} if s.iw_samples is not None else None,
                detectors=s.detectors,
                held_out=s.held_out, transforms=list(s.transforms))
        return summaries, {"mean_bpd": {f"{x.dataset}|{x.split}|{x.transform}": round(x.means["bpd"], 4)
                                        for x in summaries}}
    if step.kind == "decompose":
        from ..analysis import decomposition as dec
        from ..analysis.tables import load_run_scores

        with run_lock(rd, "ood-audit decompose"):
            df, meta = load_run_scores(rd)
            table = dec.decompose(df, meta)
            dec.write_decomposition(table, rd.decomposition)
            over = None
            if exp.decompose.over_training:
                from ..analysis.over_training import over_training

                with hooks.score_progress() as progress:
                    over = over_training(rd, list(exp.score.ood), limit=exp.decompose.over_training_limit,
                                         root=data_root, download=download, device=device,
                                         progress=progress)
            second = None
            if exp.decompose.second_order:
                from ..analysis.second_order import second_order_run

                d = exp.decompose
                second = second_order_run(rd, list(exp.score.ood), limit=d.second_order_limit,
                                          root=data_root, download=download,
                                          batch_size=d.second_order_batch, device=device,
                                          seed=meta.dequant_seed, center=d.second_order_center)
        return (table, dec.gaps(table), over, second), {}
    from ..report.build import build_report, parse_formats

    r = exp.report
    report = build_report([run.scored for run in exp.runs], exp.report_dir, parse_formats(r.formats),
                          list(r.gates), n_boot=r.n_boot, seed=r.seed)
    detail = "; ".join(g.detail for g in report.failed)
    return report, {"gates_passed": report.passed, "gate_detail": detail}
