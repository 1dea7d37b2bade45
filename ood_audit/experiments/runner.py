"""Running an experiment's steps: statuses, skipping what is complete, the state file.

Each kind of step is a row of :data:`~.steps.STEP_KINDS`: the library call behind it
(the function its CLI command calls), what the state file records, its outputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.registry import DATASETS, load_dataset
from ..faults import keeping
from ..runs import RunDir, atomic_write_text, run_lock
from .hooks import ExperimentHooks
from .plan import plan
from .spec import STATE_FILE, Experiment, Step
from .steps import STEP_KINDS, Env


@dataclass
class ExperimentResult:
    out: Path
    seconds: float
    ran: list[str]
    skipped: list[str]
    gates_passed: bool = True
    gate_detail: str = ""
    report_files: list[str] = field(default_factory=list)


def statuses(exp: Experiment, steps: list[Step], force: bool = False) -> list[str]:
    """Per step: ``done`` (skip), ``new``, or ``resume`` (a train step left half-way)."""
    state = read_state(exp.out).get("steps", {})
    out: list[str] = []
    redone: set[str] = set()  # names of runs with a step to redo: their later steps follow
    for step in steps:
        kind = STEP_KINDS[step.kind]
        if kind.status is not None:
            status = "new" if force else kind.status(step)
        else:
            recorded = state.get(step.id, {}).get("fingerprint")
            upstream = bool(redone) if step.run is None else step.run.name in redone
            fresh = (recorded == step.fingerprint
                     and all(p.exists() for p in kind.outputs(step, exp)))
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
    if download:
        return  # the steps fetch what is missing
    wanted = dict.fromkeys(pair for step, st in zip(steps, status, strict=True) if st != "done"
                           for pair in STEP_KINDS[step.kind].data(step, exp))
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
            kind = STEP_KINDS[step.kind]
            if st == "done":
                hooks.step_skip(step, i, len(steps), kind.skip_reason)
                result.skipped.append(step.id)
                _gates(result, read_state(exp.out)["steps"][step.id],
                       kind.outputs(step, exp))
                continue
            hooks.step_start(step, i, len(steps), st)
            t0 = time.perf_counter()
            # a fault of the machine (a full disk...) keeps the steps done before this one
            with keeping(f"the steps before this {step.kind} step are done ({exp.out / STATE_FILE}); "
                         "the same ood-audit run continues from it"):
                value, record = kind.call(step, Env(exp, st, force, data_root, download, hooks))
            seconds = time.perf_counter() - t0
            _write_state(exp, step, {"seconds": round(seconds, 1), **record})
            result.ran.append(step.id)
            _gates(result, record, [p for k, p in getattr(value, "files", {}).items()
                                    if k != "junit"])
            hooks.step_end(step, seconds, value)
    result.seconds = time.perf_counter() - start
    return result


def _gates(result: ExperimentResult, record: dict, files: list[Path]) -> None:
    """The report step's record says whether its gates passed and which files it wrote."""
    if "gates_passed" in record:
        result.gates_passed, result.gate_detail = record["gates_passed"], record["gate_detail"]
        result.report_files = [str(p) for p in files]
