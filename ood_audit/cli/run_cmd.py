"""``ood-audit run``: a whole experiment (train -> score -> decompose -> report) from one YAML."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from ..errors import GateFailed
from . import render
from .options import DataRootOpt, DeviceOpt, DownloadOpt

ExperimentArg = Annotated[Path, typer.Argument(help=(
    "The experiment YAML (see examples/paper/ and examples/README.md for every key)."),
    show_default=False)]
VariantOpt = Annotated[str | None, typer.Option("--variant", show_default=False, help=(
    "Apply the file's variants.NAME overrides, e.g. --variant gpu (the paper-size preset). "
    "Default output folder: runs/<name>-<variant>."))]
PresetOpt = Annotated[str | None, typer.Option("--preset", show_default=False, help=(
    "Override every run's size preset: tiny, small (CPU) or paper (L=3, K=32, 512 hidden; "
    "a GPU)."))]
OutOpt = Annotated[Path | None, typer.Option("--out", show_default=False, help=(
    "Experiment folder. Default: the file's out key, else runs/<name>."))]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help=(
    "Print the equivalent ood-audit commands (a shell script) and which steps are "
    "complete; run nothing."))]
ForceOpt = Annotated[bool, typer.Option("--force", help=(
    "Redo every step, retraining from scratch (deletes the experiment's run folders first)."))]


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def _name(step) -> str:
    """``train runs/x/glow``; the report step names its folder."""
    return f"{step.kind} {step.run.root if step.run is not None else step.argv[step.argv.index('--out') + 1]}"


class Hooks:
    """What ``run`` shows (:class:`~ood_audit.experiments.hooks.ExperimentHooks`): a
    header per step, the commands' own progress bars and tables, a time per step."""

    def log(self, message: str) -> None:
        render.note(message)

    def step_start(self, step, index: int, total: int, action: str) -> None:
        how = " (resuming)" if action == "resume" else ""
        render.out.rule(f"[bold]step {index}/{total}: {step.kind}{how}[/]", align="left")
        render.line(f"$ {step.command().splitlines()[-1]}")

    def step_skip(self, step, index: int, total: int, why: str) -> None:
        render.line(f"step {index}/{total}: {_name(step)}: skipped, {why} (--force redoes it)")

    def step_end(self, step, seconds: float, result: object) -> None:
        render.STEP_PRINTERS[step.kind](result)
        render.out.print(f"[bold]{_name(step)}[/] took {_clock(seconds)}", highlight=False)

    def train_progress(self):
        return render.TrainBar()

    @contextlib.contextmanager
    def score_progress(self):
        with render.CountBar() as progress:
            yield progress


def run(
    experiment: ExperimentArg, variant: VariantOpt = None, preset: PresetOpt = None,
    out_dir: OutOpt = None, dry_run: DryRunOpt = False, force: ForceOpt = False,
    device: DeviceOpt = None, data_root: DataRootOpt = None, download: DownloadOpt = False,
) -> None:
    """Run an experiment of the paper end to end from one YAML: train -> score ->
    decompose -> report, calling the same code as those commands.

    A rerun continues where it stopped: a train step whose checkpoint reached its last
    epoch with the same config is skipped (an interrupted one resumes), and so are
    score, decompose and report when OUT/experiment.json records them with the same
    inputs. Exit 1 when a report gate fails (e.g. the paper's paradox did not show).

    Example: ood-audit run examples/paper/fashionmnist_vs_mnist.yaml
    """
    from ..experiments import load_experiment, run_experiment  # the library, for the work

    exp = load_experiment(experiment, variant=variant, preset=preset, out=out_dir, device=device)
    if dry_run:
        _dry_run(exp, data_root)
        return
    if exp.paper:
        out_line = f"[bold]{exp.name}[/] — the paper: {exp.paper}"
        render.out.print(out_line, highlight=False)
    result = run_experiment(exp, force=force, data_root=data_root, download=download, hooks=Hooks())
    render.out.rule()
    render.out.print(f"[bold]{exp.name}[/]: {len(result.ran)} step(s) run, {len(result.skipped)} "
                     f"skipped, total {_clock(result.seconds)}; report: "
                     f"{', '.join(result.report_files)}", highlight=False)
    if not result.gates_passed:
        raise GateFailed(result.gate_detail or "a report gate failed")


def _dry_run(exp, data_root: Path | None) -> None:
    from ..experiments import plan, statuses  # the library (torch), for the work

    steps = plan(exp, data_root)
    status = statuses(exp, steps)
    render.line(f"# {exp.name}: the equivalent commands ({exp.source}"
                + (f", variant {exp.variant}" if exp.variant else "") + f"; folder {exp.out})")
    for step, st in zip(steps, status, strict=True):
        tag = {"done": "complete: would be skipped", "resume": "would resume"}.get(st, "would run")
        render.line(f"# {step.kind} ({tag})")
        render.line(step.command())
