"""Everything the CLI shows: the consoles, rich tables, progress bars, and one printer per
command result. The numbers come from the library's results; the tables from
:mod:`ood_audit.report.render` where the report shows the same ones, so the terminal and
the report never disagree.

Results on stdout, progress and notes on stderr. Light at import (rich and the report's
plain tables): the library is imported by the commands when their work starts.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table as RichTable

from ..report.render import decomposition_tables, gate_table, metric_table, over_training_table
from ..report.second_order import second_order_note, second_order_tables
from ..report.table import Table
from ..scoring.schema import pretty


def _width(stream) -> int | None:
    """Rich's own width on a terminal; a wide fixed width in logs and pipes (CI), so
    tables of long data-set paths are not folded into unreadable columns."""
    if stream.isatty() or os.environ.get("COLUMNS"):
        return None
    return 160


out = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))


def note(message: str) -> None:
    """A one-line notice for the user (an adaptation applied, a level cap...)."""
    err.print(f"[yellow]note:[/] {message}", highlight=False)


def line(text: str) -> None:
    """A plain line on stdout (paths, sentences): no markup, no highlighting."""
    out.print(text, highlight=False, markup=False, soft_wrap=True)


def rich_table(t: Table, title: str) -> RichTable:
    """A rich table from the report's plain :class:`~ood_audit.report.table.Table`."""
    rt = RichTable(title=title, title_justify="left", header_style="bold")
    # Set labels such as "mnist[invert]" would read as rich markup: escape every cell.
    for i, h in enumerate(t.headers):
        rt.add_column(escape(h), justify="left" if i == 0 else "right", no_wrap=i == 0)
    styles = {"paradox": "red", "fail": "bold red", "pass": "green", "top": "bold"}
    for row, cls in zip(t.rows, t.classes, strict=True):
        rt.add_row(*(escape(c) for c in row), style=styles.get(cls))
    return rt


# ---------------------------------------------------------------- progress

class TrainBar:
    """A progress bar per epoch on a terminal; one line per epoch otherwise
    (:class:`~ood_audit.training.trainer.TrainProgress`)."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task = None

    def epoch_start(self, epoch, epochs, n_batches, start_batch):
        if not err.is_terminal:
            return
        self.bar = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[bpd]} bits/dim  {task.fields[rate]} img/s  "
                       "{task.fields[clipped]} clipped"),
            TimeRemainingColumn(), console=err, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("train", total=n_batches, completed=start_batch,
                                      bpd="-", rate="-", clipped="-")

    def batch(self, batch, train_bpd, images_per_s, clipped_frac=0.0):
        if self.bar is not None:
            self.bar.update(self.task, completed=batch, bpd=f"{train_bpd:.3f}",
                            rate=f"{images_per_s:.0f}", clipped=f"{clipped_frac:.0%}")

    def epoch_end(self, result):
        self.stop()
        err.print(f"epoch {result.epoch}: train {result.train_bpd:.3f} bits/dim, test "
                  f"{result.test_bpd:.3f} bits/dim, {result.images_per_s:.0f} img/s, "
                  f"{result.seconds:.0f} s, {result.clipped_frac:.0%} of steps clipped"
                  + (f", {result.nan_skips} skipped steps" if result.nan_skips else ""),
                  highlight=False)

    def stop(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class CountBar:
    """One bar per set: images scored (:class:`~ood_audit.scoring.scorer.ScoreProgress`)
    or Hessian-vector products done (``SecondOrderProgress``). A context manager. Off a
    terminal (CI logs) a plain line every ``LINE_EVERY_S`` seconds instead, so a long
    job (likelihood regret re-fits an encoder per image) still shows it is moving."""

    LINE_EVERY_S = 30.0

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(),
                            console=err, transient=True, disable=not err.is_terminal)
        self.task = None
        self.label, self.total, self.done, self.last_line = "", 0, 0, time.monotonic()

    def __enter__(self) -> CountBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def start(self, label: str, total: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, visible=False)
        self.task = self.bar.add_task(label, total=total, rate="-")
        self.label, self.total, self.done = label, total, 0

    def set_start(self, job, n_images: int) -> None:
        self.start(f"{job.images.name} ({job.images.split})", n_images)

    def advance(self, n: int, images_per_s: float | None = None) -> None:
        self.bar.update(self.task, advance=n,
                        **({} if images_per_s is None else {"rate": f"{images_per_s:.0f}"}))
        self.done += n
        if not err.is_terminal and time.monotonic() - self.last_line >= self.LINE_EVERY_S:
            self.last_line = time.monotonic()
            rate = "" if images_per_s is None else f", {images_per_s:.3g} img/s"
            err.print(f"{self.label}: {self.done:,}/{self.total:,}{rate}", highlight=False)


# ---------------------------------------------------------------- results

def trained(result) -> None:
    """What ``train`` trained (:class:`~ood_audit.commands.train.TrainResult`)."""
    if result.kind == "ensemble":
        # score on the ensemble folder scores every member and their log-mean-exp.
        out.print(f"[bold]ensemble[/] of {len(result.outcomes)} -> {result.root / 'ensemble.json'}; "
                  f"next: ood-audit score {result.root} --ood mnist", highlight=False)
        return
    o = result.outcomes[0]
    last = o.results[-1] if o.results else None
    if result.kind == "background":
        t = o.config.train
        out.print(f"[bold]trained[/] background model (mu={t.perturb_mu:g}, L2 {t.weight_decay:g}) "
                  f"-> {o.run_dir}", highlight=False)
        if last:
            line(f"test bits/dim {last.test_bpd:.3f} (unperturbed test images) after epoch "
                 f"{last.epoch}; next: ood-audit score {result.root} --ood mnist (adds the "
                 "likelihood-ratio detector)")
        return
    out.print(f"[bold]trained[/] {o.config.model} on {o.config.data} ({o.n_params:,} parameters, "
              f"{o.device}) -> {o.run_dir}", highlight=False)
    if last:
        line(f"test bits/dim {last.test_bpd:.3f} after epoch {last.epoch}; next: "
             f"ood-audit score {o.run_dir} --ood mnist")


def member_trained(outcome) -> None:
    """One member of ``train --seeds`` is done."""
    last = outcome.results[-1] if outcome.results else None
    out.print(f"[bold]trained[/] member {outcome.run_dir.name} (seed {outcome.config.train.seed}) "
              f"-> {outcome.run_dir}" + (f", test bits/dim {last.test_bpd:.3f}" if last else ""),
              highlight=False)


def scored(result, *, next_step: bool = True) -> None:
    """The per-set means and every detector's AUROC (:class:`~.commands.score.ScoreResult`)."""
    out.print(_set_table(result))
    out.print(_detector_table(result.detector_aurocs()))
    if next_step:
        line(f"wrote {result.run.scores} ({result.rows:,} rows); next: ood-audit decompose "
             f"{result.run.root}")


def _set_table(result) -> RichTable:
    """Per set: mean bits/dim, log p(x), the model's terms (log p(z) and log|det| for a
    flow), and the AUROC of log p(x) with in-distribution as the positive class."""
    terms = [k for k in result.sets[0].means if k not in ("bpd", "log_px")]
    table = RichTable(title="scores (means per image, nats)")
    for col in ("data set", "role", "split", "n", "bits/dim", "log p(x)", *map(pretty, terms),
                "AUROC"):
        table.add_column(col, justify="left" if col in ("data set", "role", "split") else "right")
    for s in result.sets:
        auroc = result.likelihood_auroc(s)
        shown = "" if auroc is None else f"{auroc:.3f}" + (" (prefers OOD)" if auroc < 0.5 else "")
        name = s.dataset if s.transform in ("none", "") else f"{s.dataset}[{s.transform}]"
        table.add_row(escape(name), s.role, s.split, str(s.n), f"{s.means['bpd']:.3f}",
                      *(f"{s.means[k]:.1f}" for k in ("log_px", *terms)), shown)
    return table


def _detector_table(aurocs: dict[str, dict[str, float]]) -> RichTable:
    """AUROC per detector and OOD set, the best per set in bold."""
    sets = list(dict.fromkeys(label for per_set in aurocs.values() for label in per_set))
    table = RichTable(title="detectors: AUROC (in-distribution positive; best in bold)")
    table.add_column("detector")
    for label in sets:
        table.add_column(escape(label), justify="right")
    best = {s: max((v[s] for v in aurocs.values()), default=float("nan")) for s in sets}
    for name, per_set in aurocs.items():
        cells = [f"{per_set[s]:.3f}" for s in sets]
        table.add_row(name, *(f"[bold]{c}[/]" if per_set[s] == best[s] and len(aurocs) > 1
                              else c for c, s in zip(cells, sets, strict=True)))
    return table


def decomposed(result, *, tables: bool = True) -> None:
    """The decomposition's tables and gap sentences, and the optional analyses
    (:class:`~ood_audit.commands.decompose.DecomposeResult`)."""
    if tables:
        means, diffs = decomposition_tables(result.records, result.reference)
        bpd = {r["label"]: r for r in result.records if r["term"] == "bpd"}
        means.headers.insert(1, "bits/dim")
        for row in means.rows:
            b = bpd[row[0]]
            row.insert(1, f"{b['mean']:.3f}" + (f" ± {b['std']:.3f}" if b["std"] is not None else ""))
        out.print(rich_table(means, f"{result.model} on {result.in_dataset}: log p(x) and its "
                                    "terms per data set (nats per image)"))
        if len(diffs.headers) > 1:
            out.print(rich_table(diffs, f"Difference from {result.reference} (nats; share of the "
                                        "log p(x) gap)"))
    for message in result.notes:
        note(message)
    for gap in result.gaps:
        line(gap.sentence())
    if tables:
        line(f"wrote {result.path}")
    if result.over_training is not None:
        out.print(rich_table(over_training_table(result.over_training.to_dict(orient="records")),
                             "over training: mean per image (nats; bpd)"))
        line(f"wrote {result.run.over_training}")
    if result.second_order is not None:
        gaps_t, var_t = second_order_tables(result.second_order)
        out.print(rich_table(gaps_t, "Second-order prediction vs measured gap (nats per image, "
                                     "OOD minus in-distribution test)"))
        if tables:
            out.print(rich_table(var_t, "Per-channel variance of the dequantized pixels"))
        line(second_order_note(result.second_order))
        if tables:
            line(f"wrote {result.run.second_order}")


def reported(result, *, files: bool = True) -> None:
    """The metric table, the gates, the files written (:class:`~.report.build.ReportResult`)."""
    several = len(result.summary["runs"]) > 1
    out.print(rich_table(metric_table(result.rows, with_run=several, compact=True),
                         "OOD detection (in-distribution positive; higher score = more in)"))
    if result.gates:
        out.print(rich_table(gate_table(result.summary["gates"]), "CI gates"))
    if files:
        line("wrote " + ", ".join(str(p) for p in result.files.values()))


def imported(result) -> None:
    """What ``import`` made (:class:`~ood_audit.commands.import_model.ImportResult`)."""
    rec = result.record
    out.print(f"[bold]imported[/] {rec.kind} {escape(rec.sources[0].path)} as {result.model} "
              f"({result.terms_from}) -> {escape(str(result.run))}", highlight=False)
    for src in rec.sources:
        line(f"  {src.role}: {src.path} (sha256 {src.sha256[:16]}...)")
    line(f"  declared training set {rec.data}, images {'x'.join(map(str, rec.input_shape))}, "
         f"input range {'uint8 pixels (discrete)' if rec.discrete else rec.input_range}")
    line(f"  terms: {', '.join(result.terms)}")
    line(f"  check: mean {result.mean_bpd:.3f} bits/dim on the first {result.n_checked} "
         f"{rec.data} test images; next: ood-audit score {result.run} --ood mnist")


def models_listed(rows) -> None:
    """The model families (:class:`~ood_audit.commands.models.FamilyRow`) as a table."""
    table = RichTable(title="model families (ood-audit train --model NAME; presets: --preset)",
                      title_justify="left", header_style="bold")
    for col in ("family", "summary", "presets", "terms written", "from"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(r.name), escape(r.summary), escape(", ".join(r.presets) or "-"),
                      escape(r.terms), escape(r.origin), style="red" if r.error else None)
    out.print(table)


#: How ``ood-audit run`` shows each step's result (files are said once, at the end).
STEP_PRINTERS = {
    "train": lambda r: [line(f"trained {o.config.model} -> {o.run_dir}: test bits/dim "
                             f"{o.results[-1].test_bpd:.3f} after epoch {o.results[-1].epoch}")
                        for o in r.outcomes if o.results],
    "score": lambda r: scored(r, next_step=False),
    "decompose": lambda r: decomposed(r, tables=False),
    "report": lambda r: reported(r, files=False),
}
