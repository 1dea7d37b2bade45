"""``ood-audit decompose``: which term of log p(x) carries the OOD likelihood gap."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table as RichTable

from ..analysis import decomposition as dec
from ..analysis.tables import load_run_scores
from ..report.render import Table, decomposition_tables, jsonable
from ..runs import resolve_run, run_lock
from .console import note, out
from .options import DataRootOpt, DeviceOpt, RunOpt


def rich_table(t: Table, title: str) -> RichTable:
    """A rich table from the report's plain :class:`~ood_audit.report.render.Table`."""
    rt = RichTable(title=title, title_justify="left", header_style="bold")
    # Set labels such as "mnist[invert]" would read as rich markup: escape every cell.
    for i, h in enumerate(t.headers):
        rt.add_column(escape(h), justify="left" if i == 0 else "right", no_wrap=i == 0)
    styles = {"paradox": "red", "fail": "bold red", "pass": "green", "top": "bold"}
    for row, cls in zip(t.rows, t.classes, strict=True):
        rt.add_row(*(escape(c) for c in row), style=styles.get(cls))
    return rt


def decompose(
    run: Path | None = RunOpt,
    csv: bool = typer.Option(
        False, "--csv", help="Write decomposition.csv instead of decomposition.parquet."
    ),
    over_training: bool = typer.Option(
        False, "--over-training", help="Also rescore a fixed subset of each scored set with "
        "every epoch checkpoint and tabulate log p(z) and log|det| per epoch (the paper's "
        "plots over training); writes over_training.parquet."),
    over_training_limit: int = typer.Option(
        500, "--over-training-limit", help="Images per set rescored for --over-training."),
    second_order: bool = typer.Option(
        False, "--second-order", help="Also predict each OOD set's gap in mean log p(x) from "
        "second-order statistics, 1/2 Tr(H (Sigma_ood - Sigma_in)) with H the Hessian of "
        "log p(x) at the in-distribution test mean (Nalisnick et al. 2019, section 5), by "
        "Hessian-vector products; for glow-cv also the paper's closed form from per-channel "
        "variances and the 1x1 conv weights. Sets it beside the measured gap on the same "
        "images; writes second_order.json. Flows only (glow, glow-cv): PixelCNN++ and the "
        "VAE model integer pixels, so their log p(x) has no Hessian."),
    second_order_limit: int = typer.Option(
        500, "--second-order-limit", help="Images per set for --second-order (the first N "
        "of each set, dequantized as the scorer did)."),
    second_order_batch: int = typer.Option(
        64, "--second-order-batch", help="Hessian-vector products per batch for --second-order."),
    second_order_center: str = typer.Option(
        "pooled", "--second-order-center", help="Expansion point x0 for --second-order: "
        "'pooled' (default: the shared mean of the in-distribution test set and the OOD set "
        "together, one x0 per OOD set, as the paper's expansion about a shared mean) or 'in' "
        "(the in-distribution test mean; on FashionMNIST -> MNIST Glows this point is far "
        "from MNIST and the quadratic expansion there gets the sign wrong)."),
    device: str = DeviceOpt,
    data_root: Path = DataRootOpt,
) -> None:
    """Split log p(x) into its terms per data set (log p(z), log|det| per level and
    layer kind for a flow) and say which term carries each OOD set's likelihood gap.

    Reads the run's scores.parquet; writes decomposition.parquet (or .csv) into the run.
    """
    rd = resolve_run(run, need_model=False)
    with run_lock(rd, "ood-audit decompose"):  # never interleave with a train or score
        df, meta = load_run_scores(rd)
        table = dec.decompose(df, meta)
        path = dec.write_decomposition(
            table, rd.root / ("decomposition.csv" if csv else "decomposition.parquet"))
        records = jsonable(table.to_dict(orient="records"))
        gaps = dec.gaps(table)
        reference = next(r["label"] for r in records
                          if r["role"] == "in" and r["split"] == "test" and r["transform"] == "none")
        means, diffs = decomposition_tables(records, reference)
        bpd = {r["label"]: r for r in records if r["term"] == "bpd"}
        means.headers.insert(1, "bits/dim")
        for row in means.rows:
            b = bpd[row[0]]
            spread = f" ± {b['std']:.3f}" if b["std"] is not None else ""
            row.insert(1, f"{b['mean']:.3f}{spread}")
        out.print(rich_table(means, f"{meta.model} on {meta.in_dataset}: log p(x) and its terms "
                                    "per data set (nats per image)"))
        if len(diffs.headers) > 1:
            out.print(rich_table(
                diffs, f"Difference from {reference} (nats; share of the log p(x) gap)"))
        if not gaps:
            note("no OOD set in the scores: run ood-audit score --ood mnist to compare one")
        for gap in gaps:
            out.print(gap.sentence(), highlight=False)
        out.print(f"wrote {path}", highlight=False)
        if over_training:
            _over_training(rd, df, over_training_limit, device, data_root)
        if second_order:
            _second_order(rd, df, meta, second_order_limit, second_order_batch,
                          second_order_center, device, data_root)


def _over_training(rd, df, limit: int, device: str | None, data_root: Path | None) -> None:
    from ..analysis.over_training import over_training as rescore
    from ..analysis.over_training import wide
    from .score_cmd import RichScoreProgress

    ood = [str(d) for d in df.loc[(df["role"] == "ood") & (df["transform"] == "none"),
                                  "dataset"].unique()]
    progress = RichScoreProgress()
    with progress.bar:
        table = rescore(rd, ood, limit=limit, root=data_root, device=device or "auto",
                        progress=progress)
    grid = wide(table)
    rt = RichTable(title=f"over training: mean per image on {limit} images per set (nats; bpd)",
                   title_justify="left", header_style="bold")
    rt.add_column("epoch", justify="right")
    for dataset, term in grid.columns:
        rt.add_column(f"{dataset}\n{term}", justify="right")
    for epoch, row in grid.iterrows():
        rt.add_row(str(epoch), *(f"{v:.3f}" if term == "bpd" else f"{v:.1f}"
                                 for (_, term), v in row.items()))
    out.print(rt)
    out.print(f"wrote {rd.over_training}", highlight=False)


def _second_order(rd, df, meta, limit: int, batch: int, center: str, device: str | None,
                  data_root: Path | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..analysis import second_order as so
    from ..report.second_order import second_order_note, second_order_tables
    from .console import err

    class Bar(so.SecondOrderProgress):
        def __init__(self) -> None:
            self.bar = Progress(TextColumn("H v {task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                                transient=True, disable=not err.is_terminal)
            self.task = None

        def start(self, label: str, total: int) -> None:
            if self.task is not None:
                self.bar.update(self.task, visible=False)
            self.task = self.bar.add_task(label, total=total)

        def advance(self, n: int) -> None:
            self.bar.update(self.task, advance=n)

    ood = [str(d) for d in df.loc[(df["role"] == "ood") & (df["transform"] == "none"),
                                  "dataset"].unique()]
    if not ood:
        note("--second-order needs an OOD set in the scores: run ood-audit score --ood mnist")
        return
    progress = Bar()
    with progress.bar:
        result = so.second_order_run(rd, ood, limit=limit, root=data_root, batch_size=batch,
                                     device=device or "auto", seed=meta.dequant_seed,
                                     center=center, progress=progress)
    gaps_t, var_t = second_order_tables(result)
    out.print(rich_table(gaps_t, f"Second-order prediction vs measured gap, {limit} images per "
                                 "set (nats per image, OOD minus in-distribution test)"))
    out.print(rich_table(var_t, "Per-channel variance of the dequantized pixels"))
    out.print(second_order_note(result), highlight=False)
    out.print(f"wrote {rd.second_order}", highlight=False)
