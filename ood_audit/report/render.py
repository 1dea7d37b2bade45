"""The report's content as plain tables, and its Markdown form.

Every table of the report is built here as :class:`Table` rows of strings, from the
summary dict that becomes ``summary.json`` only; the HTML page
(:mod:`~ood_audit.report.html_page`), the Markdown below and the CLI's terminal tables
format those rows, so they never disagree on a number.
"""

from __future__ import annotations

import json

from ..scoring.schema import BACKGROUND_KEY, MEMBER_KEY_PREFIX, TRAIN_ROWS_KEY, pretty
from .second_order import second_order_note, second_order_tables
from .table import Interval, Table, md_table, num, pct, slug, with_ci

__all__ = ["Interval", "Table", "md_table", "num", "pct", "slug", "with_ci"]


METRIC_HEADERS = ["AUROC", "AUPR-In", "AUPR-Out", "FPR@95TPR", "OOD above in-median"]
METRIC_KEYS = ["auroc", "aupr_in", "aupr_out", "fpr95", "share_above_median"]


BEST_MARK = " (best)"


def metric_table(rows: list[dict], with_run: bool, compact: bool = False) -> Table:
    """One row per (run,) detector and OOD set; ``compact`` (a terminal) drops the sample
    sizes and all intervals but AUROC's. The detector with the highest AUROC on a set
    (``row["best"]``) is marked "(best)" and gets the ``best`` row class."""
    heads = ["detector", "OOD set"] + ([] if compact else ["n in / OOD"])
    t = Table((["run"] if with_run else []) + heads + METRIC_HEADERS
              + ["bits/dim in → OOD", "verdict"])
    for r in rows:
        name = r["detector"] + (BEST_MARK if r.get("best") else "")
        cells = ([r["run"]] if with_run else []) + [name, r["ood_set"]]
        if not compact:
            cells.append(f"{num(r['n_in'])} / {num(r['n_ood'])}")
        cells += [with_ci(r, k) if not compact or k == "auroc" else num(r[k]) for k in METRIC_KEYS]
        cells += [f"{num(r['mean_bpd_in'])} → {num(r['mean_bpd_ood'])}", r["verdict"]]
        classes = ["paradox"] if (r["auroc"] is not None and r["auroc"] < 0.5) else []
        t.add(cells, " ".join(classes + (["best"] if r.get("best") else [])))
    return t


#: Key of the detector x OOD set AUROC figure among the report's figures (no run prefix:
#: it spans every run; a run's own figures are keyed ``<run>/<figure>``).
OVERVIEW_FIGURE = "overview"


def published_cell(entries: list[dict]) -> str:
    """The AUROCs a paper reports for the same pairing, with their sources: "0.99 (Ren et
    al. 2019, table 3; pixelcnn)"; "–" when none is recorded."""
    return "; ".join(f"{p['auroc']:.2f} ({p['citation']}; {p['model']})" for p in entries) or "–"


def metric_tables_by_set(rows: list[dict], with_run: bool) -> list[tuple[str, str, Table]]:
    """The metric table split by OOD set, narrow enough for a page: (set label, note,
    table) per set, in order of appearance. Each table has a row per (run,) detector.
    What is the same for every detector moves to the note: the mean bits/dim of the
    in-distribution test and OOD sets (per run), and the sample sizes unless a detector
    left NaN scores out. A "published AUROC" column, beside ours, when a detector's paper
    reports this pairing."""
    out = []
    for label in dict.fromkeys(r["ood_set"] for r in rows):
        group = [r for r in rows if r["ood_set"] == label]
        sizes = {(r["n_in"], r["n_ood"]) for r in group}
        n_column = len(sizes) > 1
        published = any(r.get("published") for r in group)
        t = Table((["run"] if with_run else []) + ["detector"]
                  + (["n in / OOD"] if n_column else []) + METRIC_HEADERS[:1]
                  + (["published AUROC"] if published else []) + METRIC_HEADERS[1:]
                  + ["verdict"])
        for r in group:
            name = r["detector"] + (BEST_MARK if r.get("best") else "")
            paradox = r["auroc"] is not None and r["auroc"] < 0.5
            cells = [with_ci(r, k) for k in METRIC_KEYS]
            if published:
                cells.insert(1, published_cell(r.get("published") or []))
            t.add(([r["run"]] if with_run else []) + [name]
                  + ([f"{num(r['n_in'])} / {num(r['n_ood'])}"] if n_column else [])
                  + cells + [r["verdict"]],
                  " ".join((["paradox"] if paradox else []) + (["best"] if r.get("best") else [])))
        bpd = {r.get("run", ""): f"{num(r['mean_bpd_in'])} → {num(r['mean_bpd_ood'])}"
               for r in group}
        note = (f"bits/dim in-distribution test → {label}: "
                + "; ".join(f"{run}: {v}" if with_run else v for run, v in bpd.items()))
        if not n_column:
            n_in, n_ood = sizes.pop()
            note += f"; n = {num(n_in)} in-distribution, {num(n_ood)} OOD"
        out.append((label, note, t))
    return out


def typicality_table(section: dict) -> Table:
    """The batch typicality test: per OOD set and batch size M, the bootstrap threshold
    and the shares of in-distribution and OOD batches it flags."""
    t = Table(["OOD set", "M", "threshold eps (nats)", "in-dist. batches flagged",
               "OOD batches flagged", "AUROC"])
    for r in section["rows"]:
        t.add([r["ood_set"], r["batch_size"], num(r["threshold"], 2), pct(r["in_flagged"]),
               pct(r["ood_flagged"]), num(r["auroc"])])
    return t


def typicality_note(section: dict) -> str:
    return (f"Nalisnick et al. (2019b): a batch of M inputs is flagged as OOD when "
            f"|mean -log p(x) - H_hat| exceeds the {section['alpha']:.0%} quantile of that "
            f"statistic over {section['n_batches']:,} bootstrap batches of M in-distribution "
            f"train rows; H_hat = {num(section['entropy_nats'], 1)} nats from "
            f"{section['n_train']:,} train rows. Batches of in-distribution test and OOD "
            "inputs drawn with replacement.")


CONTRAST_NOTE = (
    "score --transform contrast=ALPHA maps each image to m + ALPHA (x - m), m its mean "
    "pixel (rounded, clipped to 0..255), so its variance scales by about ALPHA^2; ALPHA = 1 "
    "is the untransformed set. The second-order analysis of Nalisnick et al. (2019) "
    "predicts mean bits/dim to increase monotonically with ALPHA: less variance, higher "
    "likelihood.")


def contrast_table(records: list[dict]) -> Table:
    """Mean bits/dim per data set (rows) and contrast factor ALPHA (columns), with the
    trend and whether it is the predicted one (rising with ALPHA)."""
    alphas = sorted({a for r in records for a in r["alphas"]})
    t = Table(["set", "role", *[f"ALPHA={a:g}" for a in alphas], "monotone",
               "as predicted"])
    for r in records:
        by = dict(zip(r["alphas"], r["mean_bpd"], strict=True))
        t.add([r["set"], r["role"], *[num(by.get(a)) for a in alphas], r["monotone"],
               "yes" if r["as_predicted"] else "no"])
    return t


def gate_table(gates: list[dict]) -> Table:
    t = Table(["gate", "run", "value", "result"])
    for g in gates:
        t.add([g["expr"], g["run"], num(g["value"], 4), "PASS" if g["passed"] else "FAIL"],
              "pass" if g["passed"] else "fail")
    return t


def run_meta_table(run: dict) -> Table:
    t = Table(["", ""])
    sha = run.get("checkpoint_sha256") or ""
    adapt = ", ".join(f"{k}: {v}" for k, v in (run.get("adaptations") or {}).items()) or "none"
    cfg = run.get("run_config") or {}
    for key, value in [("model", run["model"]), ("preset", cfg.get("preset", "–")),
                       ("trained on", run["in_dataset"]), ("reference set", run["reference"]),
                       ("shape adaptations", adapt),
                       ("checkpoint sha256", sha[:16] + "…" if sha else "–"),
                       ("dequantization seed", run.get("dequant_seed")),
                       ("ood-audit version", run.get("version")), ("run directory", run["path"])]:
        t.add([key, value if isinstance(value, str) else num(value)])
    extra = run.get("extra") or {}
    if BACKGROUND_KEY in extra:
        try:
            bg = json.loads(extra[BACKGROUND_KEY])
            t.add(["likelihood-ratio background", f"mu={bg.get('mu')}, L2 "
                   f"{bg.get('weight_decay')}, epoch {bg.get('epoch')}, {bg.get('path')}"])
        except ValueError:
            pass
    members = sorted(k for k in extra if k.startswith(MEMBER_KEY_PREFIX)
                     and k[len(MEMBER_KEY_PREFIX):].isdigit())
    if members:
        t.add(["waic ensemble", f"{len(members) + 1} models (this run and {len(members)} "
               "--member run(s))"])
    if TRAIN_ROWS_KEY in extra:
        t.add(["train rows (typicality H_hat)", extra[TRAIN_ROWS_KEY]])
    return t


def detector_legend(run: dict) -> Table:
    """The detectors shown: each score's formula and the paper it comes from (their
    score functions' docstrings), and what that paper reports, when recorded."""
    t = Table(["detector", "score (higher = more in-distribution)", "paper", "published AUROC"])
    for d in run["detectors"]:
        published = "; ".join(f"{p['auroc']:.2f} ({p['in_dataset']} -> {p['ood']}, {p['citation']})"
                              for p in d.get("published", []))
        t.add([d["name"], d["summary"], d.get("paper", ""), published or "–"])
    return t


def sets_table(run: dict) -> Table:
    t = Table(["set", "role", "n", "bits/dim (mean ± sd)", "log p(x) nats (mean ± sd)"])
    for s in run["sets"]:
        extra = f" ({s['n_nonfinite']} non-finite)" if s.get("n_nonfinite") else ""
        t.add([s["label"], s["role"], num(s["n"]) + extra,
               f"{num(s['mean_bpd'])} ± {num(s['std_bpd'])}",
               f"{num(s['mean_log_px'], 1)} ± {num(s['std_log_px'], 1)}"])
    return t


_ORDER = {"total": 0, "group": 1, "level": 2, "layer_kind": 3, "term": 4}


def decomposition_tables(records: list[dict], reference: str) -> tuple[Table, Table]:
    """(per-set means of log p(x) and its top-level terms, per-term gaps of every other set).

    ``records``: a decomposition table as JSON-ready records; ``reference``: its
    in-distribution test label. Gap rows: totals, groups, per level, per layer kind, terms.
    """
    top = list(dict.fromkeys(r["term"] for r in records if r["top_level"]))
    labels = list(dict.fromkeys(r["label"] for r in records))
    by = {(r["label"], r["term"]): r for r in records}
    means = Table(["set", *[f"{pretty(t)} (mean ± sd)" for t in ["log_px", *top]]])
    for label in labels:
        means.add([label, *[f"{num(by[(label, t)]['mean'], 1)} ± {num(by[(label, t)]['std'], 1)}"
                            for t in ["log_px", *top]]])
    others = [lb for lb in labels if lb != reference]
    first = [r for r in records if r["label"] == labels[0] and r["term"] != "bpd"]
    order = [r["term"] for r in sorted(first, key=lambda r: (
        r["aggregate"] != "total", not r["top_level"], _ORDER.get(r["aggregate"], 9)))]
    diffs = Table(["term", *[f"{lb}: diff (share)" for lb in others]])
    for term in order:
        cells = []
        for lb in others:
            r = by.get((lb, term))
            share = None if r is None else r["share_of_gap"]
            cells.append("–" if r is None else num(r["diff_vs_in"], 1)
                         + (f" ({pct(share)})" if share is not None else ""))
        diffs.add([pretty(term), *cells], "top" if term in top or term == "log_px" else "")
    return means, diffs


def over_training_table(records: list[dict]) -> Table:
    """The over-training table: one row per epoch, one column per (data set, term) mean,
    pivoted from ``decompose --over-training``'s long rows (epoch, dataset, term, mean);
    any other shape is shown as it is."""
    needed = {"epoch", "dataset", "term", "mean"}
    if not records or not needed <= set(records[0]):
        return records_table(records)
    present = {r["term"] for r in records}
    terms = [t for t in ("bpd", "log_px", "log_pz", "logdet") if t in present]
    cols = list(dict.fromkeys((r["dataset"], r["term"]) for r in records if r["term"] in terms))
    cols.sort(key=lambda c: terms.index(c[1]))
    cell = {(r["epoch"], r["dataset"], r["term"]): r["mean"] for r in records}
    t = Table(["epoch", *[f"{d} {pretty(term)}" for d, term in cols]])
    for epoch in sorted({r["epoch"] for r in records}):
        t.add([epoch, *[num(cell.get((epoch, d, term)), 3 if term == "bpd" else 1)
                        for d, term in cols]])
    return t


ENSEMBLE_NOTE = ("AUROC of log p(x) per ensemble member, their mean, and the ensemble's "
                 "log mean density log (1/M) sum_j p_j(x). Nalisnick et al. (2019) find that "
                 "ensembling does not close the gap: the ensemble stays near its members.")


def ensemble_table(result: dict) -> Table:
    """Per OOD set: each member's AUROC, their mean, the ensemble's (``ensemble`` section)."""
    t = Table(["OOD set", *result["members"], "members' mean", "ensemble"])
    for r in result["rows"]:
        t.add([r["ood_set"], *[r[m] for m in result["members"]], r["members_mean"],
               r["ensemble"]], "paradox" if r["ensemble"] is not None and r["ensemble"] < 0.5 else "")
    return t


def _second_order_md(result: dict | None) -> list[str]:
    if not result:
        return []
    gaps_t, var_t = second_order_tables(result)
    return ["### Second-order prediction\n", second_order_note(result) + "\n",
            md_table(gaps_t), md_table(var_t)]


def records_table(records: list[dict]) -> Table:
    headers = list(dict.fromkeys(k for r in records for k in r))
    t = Table(headers)
    for r in records:
        t.add([r.get(h) for h in headers])
    return t


# ---------------------------------------------------------------- Markdown

def render_markdown(summary: dict, fig_paths: dict[str, str] | None) -> str:
    """The report as GitHub Markdown; ``fig_paths`` (key -> relative PNG path) or None
    for a text-only version (the CI job summary)."""
    runs = summary["runs"]
    out = [f"# ood-audit report: {', '.join(r['name'] for r in runs)}\n",
           f"_ood-audit {summary['version']}, generated {summary['generated_at']}._\n"]
    if summary["gates"]:
        ok = summary["gates_passed"]
        out.append("## CI gates\n\n" + ("**All gates hold.**\n" if ok else "**Gate(s) failed.**\n")
                   + "\n" + md_table(gate_table(summary["gates"])))

    def img(key: str, alt: str) -> str:
        return f"![{alt}]({fig_paths[key]})\n" if fig_paths and key in fig_paths else ""

    out.append("## Detection metrics\n\n" + summary["convention"] + "\n")
    out.append(img(OVERVIEW_FIGURE, "AUROC with 95% interval per detector and OOD set"))
    for label, note, t in metric_tables_by_set(summary["metrics"], with_run=len(runs) > 1):
        out.append(f"### OOD set: {label}\n\n{note}\n\n" + md_table(t))

    for run in runs:
        n = run["name"]
        means, diffs = decomposition_tables(run["decomposition"], run["reference"])
        out += [f"## Run {n}\n", md_table(run_meta_table(run)),
                img(f"{n}/hist", "bits/dim histograms"),
                "### Likelihood per data set\n", md_table(sets_table(run))]
        out.append(img(f"{n}/roc", "ROC curves, one panel per detector"))
        out += ["### Detectors\n", md_table(detector_legend(run))]
        if run.get("ensemble"):
            out += ["### Ensemble vs members (AUROC)\n", ENSEMBLE_NOTE + "\n",
                    md_table(ensemble_table(run["ensemble"]))]
        if run.get("typicality_batches"):
            tb = run["typicality_batches"]
            out += ["### Typicality test on batches\n", typicality_note(tb) + "\n",
                    md_table(typicality_table(tb))]
        if run.get("contrast_sweep"):
            out += ["### Contrast sweep: bits/dim vs variance\n", CONTRAST_NOTE + "\n",
                    img(f"{n}/contrast", "mean bits/dim vs contrast factor"),
                    md_table(contrast_table(run["contrast_sweep"]))]
        out += ["### Decomposition\n", "".join(f"- {g['sentence']}\n" for g in run["gaps"]),
                img(f"{n}/decomposition", "decomposition"), md_table(means),
                f"\nDifference from {run['reference']} "
                "(nats per image; share of the log p(x) gap):\n\n",
                md_table(diffs), img(f"{n}/training", "training curve"),
                img(f"{n}/pixel-maps", "per-pixel log-likelihood")]
        if run.get("over_training"):
            out += ["### Over training\n", md_table(over_training_table(run["over_training"]))]
        out += _second_order_md(run.get("second_order"))
        if run.get("notes"):
            out.append("".join(f"- note: {x}\n" for x in run["notes"]))
    return "\n".join(x for x in out if x)
