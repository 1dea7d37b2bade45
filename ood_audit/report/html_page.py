"""The report as one self-contained HTML page.

It reads only the summary dict that becomes ``summary.json`` and the PNG figures, and
builds its tables from :mod:`~ood_audit.report.render`'s :class:`Table` rows, as the
Markdown does, so the two never disagree on a number. Images are base64 data URIs, CSS
is inline, nothing is fetched, and the page reflows on a phone (viewport meta, one
column below ~30rem).

Wide tables fit the page: the metrics come as one table per OOD set, an interval sits
under its estimate in smaller type instead of beside it, long verdicts wrap, and every
table scrolls inside its own box with the first column held in place.
"""

from __future__ import annotations

import base64
import html
import json

from .render import (
    CONTRAST_NOTE,
    ENSEMBLE_NOTE,
    OVERVIEW_FIGURE,
    Interval,
    Table,
    contrast_table,
    decomposition_tables,
    detector_legend,
    ensemble_table,
    gate_table,
    metric_tables_by_set,
    over_training_table,
    run_meta_table,
    sets_table,
    typicality_note,
    typicality_table,
)
from .second_order import second_order_note, second_order_tables

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1500px;
padding:1rem;color:#222;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.25rem;border-bottom:2px solid #ddd;padding-bottom:.2rem}
h3{font-size:1.05rem;margin-top:1.4rem}h4{font-size:.95rem;margin:1rem 0 .2rem}
.runs{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,30rem),1fr));gap:1.5rem}
.run{min-width:0}.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0}
th,td{padding:.25rem .5rem;border-bottom:1px solid #e3e3e3;text-align:left;white-space:nowrap;
background:#fff}
th{background:#f5f5f5}.note{color:#555;font-size:.9rem}
th:first-child,td:first-child{position:sticky;left:0;z-index:1}
.ci{display:block;font-size:.72rem;color:#666}
table.metrics th,table.metrics td:last-child{white-space:normal}
table.metrics td:last-child{min-width:9rem}
tr.paradox td{background:#fdecea}tr.best td{font-weight:600}
tr.fail td{background:#fdecea;font-weight:600}
tr.pass td:last-child{color:#1a7f37;font-weight:600}tr.top td{font-weight:600}
pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.8rem}
.banner{padding:.6rem .8rem;border-radius:4px;margin:.6rem 0}
.banner.fail{background:#fdecea;border:1px solid #e0a0a0}
.banner.pass{background:#e9f7ef;border:1px solid #9fd5b3}
"""


def _cell(c: str) -> str:
    if isinstance(c, Interval):  # estimate, then its interval on a line of its own
        return f'{html.escape(c.point)}<span class="ci">{html.escape(c.low)}–{html.escape(c.high)}</span>'
    return html.escape(c)


def _html_table(t: Table, cls: str = "") -> str:
    """``t`` in a box that scrolls sideways when the table is wider than the page."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join(
        (f'<tr class="{cls_}">' if cls_ else "<tr>") + "".join(f"<td>{_cell(c)}</td>" for c in row)
        + "</tr>" for row, cls_ in zip(t.rows, t.classes, strict=True))
    table_cls = f' class="{cls}"' if cls else ""
    return (f'<div class="scroll"><table{table_cls}><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _metric_tables(rows: list[dict], with_run: bool) -> str:
    """The metrics, one table per OOD set, each under its set's heading."""
    return "".join(f"<h4>OOD set: {html.escape(label)}</h4>"
                   + (f'<p class="note">{html.escape(note)}</p>' if note else "")
                   + _html_table(t, "metrics")
                   for label, note, t in metric_tables_by_set(rows, with_run))


def _img(figs: dict[str, bytes], key: str, alt: str) -> str:
    if key not in figs:
        return ""
    data = base64.b64encode(figs[key]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _second_order(result: dict | None) -> list[str]:
    """The "Second-order prediction" section (decompose --second-order), or nothing."""
    if not result:
        return []
    gaps_t, var_t = second_order_tables(result)
    return ["<h3>Second-order prediction</h3>",
            f'<p class="note">{html.escape(second_order_note(result))}</p>',
            _html_table(gaps_t), _html_table(var_t)]


def _run_section(run: dict, figs: dict[str, bytes], several_runs: bool) -> str:
    e = html.escape
    n = run["name"]
    means, diffs = decomposition_tables(run["decomposition"], run["reference"])
    sec = [f'<section class="run"><h2>{e(n)}</h2>', "<h3>Model, data and config</h3>",
           _html_table(run_meta_table(run)),
           "<details><summary>run config</summary>"
           f"<pre>{e(json.dumps(run['run_config'], indent=2))}</pre></details>",
           "<h3>Likelihood per data set (bits/dim)</h3>",
           _img(figs, f"{n}/hist", "bits/dim histograms"),
           _html_table(sets_table(run)), "<h3>ROC curves</h3>",
           _img(figs, f"{n}/roc", "ROC curves, one panel per detector: "
                + ", ".join(d["name"] for d in run["detectors"])),
           "<h3>Detectors</h3>", _html_table(detector_legend(run))]
    if several_runs:  # with one run, the metrics at the top are this run's
        sec += ["<h3>Metrics</h3>", _metric_tables(run["metrics"], with_run=False)]
    if run.get("ensemble"):
        sec += ["<h3>Ensemble vs members (AUROC)</h3>", f'<p class="note">{e(ENSEMBLE_NOTE)}</p>',
                _html_table(ensemble_table(run["ensemble"]))]
    if run.get("typicality_batches"):
        tb = run["typicality_batches"]
        sec += ["<h3>Typicality test on batches</h3>",
                f'<p class="note">{e(typicality_note(tb))}</p>', _html_table(typicality_table(tb))]
    if run.get("contrast_sweep"):
        sec += ["<h3>Contrast sweep: bits/dim vs variance</h3>",
                f'<p class="note">{e(CONTRAST_NOTE)}</p>',
                _img(figs, f"{n}/contrast", "mean bits/dim vs contrast factor"),
                _html_table(contrast_table(run["contrast_sweep"]))]
    sec += ["<h3>Decomposition: which term carries the gap</h3>",
            "<ul>" + "".join(f"<li>{e(g['sentence'])}</li>" for g in run["gaps"]) + "</ul>",
            _img(figs, f"{n}/decomposition", "decomposition bars"),
            _html_table(means), f'<p class="note">Difference from {e(run["reference"])} '
            "(nats per image; share of the log p(x) gap):</p>", _html_table(diffs),
            "<h3>Training curve</h3>",
            _img(figs, f"{n}/training", "training curve")
            or '<p class="note">No metrics.parquet in this run.</p>']
    if f"{n}/pixel-maps" in figs:
        sec += ["<h3>Per-pixel likelihood</h3>",
                _img(figs, f"{n}/pixel-maps", "per-pixel log-likelihood heatmaps")]
    if run.get("over_training"):
        sec += ["<h3>Over training</h3>", _html_table(over_training_table(run["over_training"]))]
    sec += _second_order(run.get("second_order"))
    if run.get("notes"):
        items = "".join(f"<li>{e(x)}</li>" for x in run["notes"])
        sec.append(f'<ul class="note">{items}</ul>')
    return "".join(sec) + "</section>"


def render_html(summary: dict, figs: dict[str, bytes]) -> str:
    """One self-contained HTML page; ``figs`` maps ``<run>/<figure>`` (and
    :data:`~ood_audit.report.render.OVERVIEW_FIGURE`) to PNG bytes."""
    e = html.escape
    runs = summary["runs"]
    parts = [f"<h1>ood-audit report: {e(', '.join(r['name'] for r in runs))}</h1>",
             f'<p class="note">ood-audit {e(summary["version"])}, generated '
             f'{e(summary["generated_at"])}. Nalisnick et al., "Do Deep Generative Models Know '
             "What They Don't Know?\" (ICLR 2019).</p>"]
    if summary["gates"]:
        ok = summary["gates_passed"]
        failed = [g["detail"] for g in summary["gates"] if not g["passed"]]
        parts.append(f'<h2>CI gates</h2><div class="banner {"pass" if ok else "fail"}">'
                     + ("All gates hold." if ok else "Gate(s) failed: " + e("; ".join(failed)))
                     + "</div>" + _html_table(gate_table(summary["gates"])))
    parts.append("<h2>Detection metrics</h2>"
                 f'<p class="note">{e(summary["convention"])}</p>'
                 + _img(figs, OVERVIEW_FIGURE, "AUROC with 95% interval per detector and OOD set")
                 + _metric_tables(summary["metrics"], with_run=len(runs) > 1))
    sections = "".join(_run_section(run, figs, len(runs) > 1) for run in runs)
    parts.append(f'<div class="runs">{sections}</div>')
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>ood-audit report</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
