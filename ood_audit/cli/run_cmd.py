"""``ood-audit run``: a whole experiment (train -> score -> decompose -> report) from one YAML."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from ..errors import GateFailed
from ..experiments import ExperimentHooks, Step, load_experiment, plan, run_experiment, statuses
from .console import note, out
from .options import DataRootOpt, DeviceOpt, DownloadOpt


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


class RichExperimentHooks(ExperimentHooks):
    """A header per step, the commands' own progress bars and tables, a time per step."""

    def log(self, message: str) -> None:
        note(message)

    def step_start(self, step: Step, index: int, total: int, action: str) -> None:
        how = " (resuming)" if action == "resume" else ""
        out.rule(f"[bold]step {index}/{total}: {step.kind}{how}[/]", align="left")
        out.print(f"$ {step.command().splitlines()[-1]}", highlight=False, markup=False,
                  soft_wrap=True)

    def step_skip(self, step: Step, index: int, total: int, why: str) -> None:
        out.print(f"step {index}/{total}: {_name(step)}: skipped, {why} "
                  "(--force redoes it)", highlight=False)

    def step_end(self, step: Step, seconds: float, result: object) -> None:
        if step.kind == "score":
            from .score_cmd import detector_table, summary_table

            out.print(summary_table(result))
            out.print(detector_table(step.run.scored))
        elif step.kind == "decompose":
            _, gaps, _, second = result
            for gap in gaps:
                out.print(gap.sentence(), highlight=False)
            if second is not None:
                from ..report.second_order import second_order_note, second_order_tables
                from .decompose_cmd import rich_table

                gaps_t, var_t = second_order_tables(second)
                out.print(rich_table(gaps_t, "Second-order prediction vs measured gap (nats per image)"))
                out.print(second_order_note(second), highlight=False)
        elif step.kind == "report":
            from ..report.render import gate_table, metric_table
            from .decompose_cmd import rich_table

            out.print(rich_table(metric_table(result.rows, with_run=len(result.summary["runs"]) > 1,
                                              compact=True), "OOD detection (in-distribution positive)"))
            if result.gates:
                out.print(rich_table(gate_table(result.summary["gates"]), "CI gates"))
        elif step.kind == "train":
            for outcome in result:
                if outcome.results:
                    last = outcome.results[-1]
                    out.print(f"trained {outcome.config.model} -> {outcome.run_dir}: test "
                              f"bits/dim {last.test_bpd:.3f} after epoch {last.epoch}", highlight=False)
        out.print(f"[bold]{_name(step)}[/] took {_clock(seconds)}", highlight=False)

    def train_progress(self):
        from .train_cmd import RichTrainProgress

        return RichTrainProgress()

    @contextlib.contextmanager
    def score_progress(self):
        from .score_cmd import RichScoreProgress

        progress = RichScoreProgress()
        with progress.bar:
            yield progress


def _name(step: Step) -> str:
    """``train runs/x/glow``; the report step names its folder."""
    return f"{step.kind} {step.run.root if step.run is not None else step.argv[step.argv.index('--out') + 1]}"


def run(
    experiment: Path = typer.Argument(..., help="The experiment YAML (see examples/paper/ and "
                                      "examples/README.md for every key).", show_default=False),
    variant: str = typer.Option(
        None, "--variant", help="Apply the file's variants.NAME overrides, e.g. --variant gpu "
        "(the paper-size preset). Default output folder: runs/<name>-<variant>."),
    preset: str = typer.Option(
        None, "--preset", help="Override every run's size preset: tiny, small (CPU) or paper "
        "(L=3, K=32, 512 hidden; a GPU)."),
    out_dir: Path = typer.Option(None, "--out", help="Experiment folder. Default: the file's "
                                 "out key, else runs/<name>."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the equivalent ood-audit commands (a shell script) and "
        "which steps are complete; run nothing."),
    force: bool = typer.Option(
        False, "--force", help="Redo every step, retraining from scratch (deletes the "
        "experiment's run folders first)."),
    device: str = DeviceOpt,
    data_root: Path = DataRootOpt,
    download: bool = DownloadOpt,
) -> None:
    """Run an experiment of the paper end to end from one YAML: train -> score ->
    decompose -> report, calling the same code as those commands.

    A rerun continues where it stopped: a train step whose checkpoint reached its last
    epoch with the same config is skipped (an interrupted one resumes), and so are
    score, decompose and report when OUT/experiment.json records them with the same
    inputs. Exit 1 when a report gate fails (e.g. the paper's paradox did not show).

    Example: ood-audit run examples/paper/fashionmnist_vs_mnist.yaml
    """
    exp = load_experiment(experiment, variant=variant, preset=preset, out=out_dir, device=device)
    if dry_run:
        _dry_run(exp, data_root)
        return
    if exp.paper:
        out.print(f"[bold]{exp.name}[/] — the paper: {exp.paper}", highlight=False)
    result = run_experiment(exp, force=force, data_root=data_root, download=download,
                            hooks=RichExperimentHooks())
    out.rule()
    out.print(f"[bold]{exp.name}[/]: {len(result.ran)} step(s) run, {len(result.skipped)} skipped, "
              f"total {_clock(result.seconds)}; report: {', '.join(result.report_files)}",
              highlight=False)
    if not result.gates_passed:
        raise GateFailed(result.gate_detail or "a report gate failed")


def _dry_run(exp, data_root: Path | None) -> None:
    steps = plan(exp, data_root)
    status = statuses(exp, steps)
    out.print(f"# {exp.name}: the equivalent commands ({exp.source}"
              + (f", variant {exp.variant}" if exp.variant else "") + f"; folder {exp.out})",
              highlight=False, markup=False, soft_wrap=True)
    for step, st in zip(steps, status, strict=True):
        tag = {"done": "complete: would be skipped", "resume": "would resume"}.get(st, "would run")
        out.print(f"# {step.kind} ({tag})", highlight=False, markup=False)
        out.print(step.command(), highlight=False, markup=False, soft_wrap=True)
