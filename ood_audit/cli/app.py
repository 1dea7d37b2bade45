"""The ``ood-audit`` Typer app: dispatches to one module per subcommand.

Exit codes: 0 success; 1 a CI gate failed (the report is still written); 2 a user error
(bad option, missing or corrupt file, unknown name) or a fault of the machine (a full
disk, a file-size limit, a read-only or removed folder, no permission, memory running
out: :mod:`ood_audit.faults`), printed as one line saying what to do and, for a fault,
the file and what was kept; 130 interrupted by Ctrl-C, one line ``interrupted`` saying
what was kept (143 for SIGTERM); anything else is a bug and keeps its traceback.

Under torchrun, rank 0 speaks for the run: the other ranks print no progress or results,
only a fault or error of their own (a user error every rank meets alike is said once).
"""

from __future__ import annotations

import sys

import typer

from .. import __version__
from ..errors import GateFailed, Interrupted, SaidByRankZero, UserError
from ..faults import describe as describe_fault
from ..torchrun_env import dist_env
from . import (
    decompose_cmd,
    fetch_cmd,
    import_cmd,
    models_cmd,
    render,
    report_cmd,
    run_cmd,
    score_cmd,
    train_cmd,
)

app = typer.Typer(
    name="ood-audit",
    help=(
        "Audit deep generative models as out-of-distribution detectors.\n\n"
        "Deep generative models often give OOD inputs HIGHER likelihood than their own "
        "data (Nalisnick et al., ICLR 2019). Typical use:\n\n"
        "  ood-audit train --model glow --data fashionmnist\n\n"
        "  ood-audit score --ood mnist --ood noise-uniform\n\n"
        "  ood-audit decompose\n\n"
        "  ood-audit report --gate 'mnist:auroc>=0.9'\n\n"
        "Or all four from one YAML: ood-audit run examples/paper/fashionmnist_vs_mnist.yaml\n\n"
        "To audit a model trained elsewhere, make its run with ood-audit import (a y0ast or "
        "rosinality Glow checkpoint, or any torch module from a Python file)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ood-audit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Audit deep generative models as OOD detectors."""


app.command("train")(train_cmd.train)
app.command("score")(score_cmd.score)
app.command("decompose")(decompose_cmd.decompose)
app.command("report")(report_cmd.report)
app.command("run")(run_cmd.run)
app.command("fetch")(fetch_cmd.fetch)
app.add_typer(import_cmd.app, name="import")
app.command("models")(models_cmd.models)


def _rank() -> int:
    """This process's rank under torchrun (0 alone, and when the variables are broken:
    the command itself then says what is wrong with them)."""
    try:
        return dist_env()[0]
    except UserError:
        return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: user errors become one line on stderr and exit 2."""
    if _rank() != 0:
        render.out.quiet = render.err.quiet = True
    try:
        rv = app(args=argv, standalone_mode=False)
    except SaidByRankZero as exc:
        sys.exit(exc.exit_code)
    except Interrupted as exc:  # a command that stopped cleanly says what it kept
        _say(f"interrupted: {exc}")
        sys.exit(exc.exit_code)
    except UserError as exc:
        _say(f"error: {exc}")
        sys.exit(UserError.exit_code)
    except GateFailed as exc:
        _say(f"gate failed: {exc}")
        sys.exit(GateFailed.exit_code)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:  # click turns Ctrl-C inside a command into Abort
        _say("interrupted")
        sys.exit(130)
    except Exception as exc:
        _exit_on_usage_error_or_fault(exc)
        raise
    # standalone_mode=False hands back --help's and typer.Exit's exit code as the value;
    # typer turns a KeyboardInterrupt inside a command into Exit(130), silently.
    if rv == Interrupted.exit_code:
        _say("interrupted")
    sys.exit(rv if isinstance(rv, int) else 0)


def _exit_on_usage_error_or_fault(exc: Exception) -> None:
    """Exit 2 with one line for a usage error or a fault of the machine; return for a bug."""
    # Usage errors (unknown option, bad value) from click, or typer's vendored click:
    # matched by shape so both work. One line, exit 2, pointing at --help.
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "ood-audit"
        _say(f"error: {exc.format_message()} (see {where} --help)")
        sys.exit(exc.exit_code)
    # A fault of the machine (a full disk, a file-size limit, a read-only or vanished
    # folder, memory running out), however a library wrapped it: the user's
    # environment, not a bug, and not a failed gate. The one place such errors
    # become a line: the file, the cause, what was kept.
    line = describe_fault(exc)
    if line is not None:
        _say(f"error: {line}")
        sys.exit(UserError.exit_code)
