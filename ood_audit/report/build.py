"""The report's library entry: analyse runs, render, write files, check gates.

:func:`build_report` turns run directories into ``report.html`` (self-contained),
``report.md`` (+ ``figures/*.png``) and ``summary.json``. Every number the report shows
is computed once, here, into the summary dict; the renderers only format that dict, so
``summary.json`` holds each of them.

Metrics: per detector and OOD set, with the in-distribution test split (role=in,
split=test, transform=none) as the positive class; see :mod:`ood_audit.analysis.metrics`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..analysis import tables, typicality
from ..analysis.decomposition import decompose, gaps
from ..analysis.detectors import DEFAULT_DETECTOR, DETECTORS
from ..analysis.detectors.table import detector_scores
from ..analysis.metrics import METRICS, ood_metrics, roc_points
from ..config import REPORT_FORMATS, ReportConfig
from ..errors import UserError
from ..runs import RunDir, atomic_write_bytes, atomic_write_text
from ..scoring.needs import member_columns
from ..scoring.pixel_maps import load_pixel_maps
from ..scoring.schema import ENSEMBLE_COLUMN
from . import html_page, plots, render
from .gates import Gate, GateResult, evaluate_gates, parse_gate
from .sweep import contrast_sweep

#: Written by ``decompose --over-training`` when present; shown as a table.
OVER_TRAINING_FILES = ("over_training.parquet", "over_training.csv")
STEP_SUMMARY_LIMIT = 1024 * 1024  # GitHub rejects job summaries above 1 MiB
CONVENTION = (
    "In-distribution (the training set's test split) is the positive class and a higher "
    "detector score means more in-distribution (OpenOOD's convention). AUROC < 0.5 means "
    "the model gives the OOD set higher scores than its own test data. FPR@95TPR: share "
    "of OOD accepted at the threshold keeping 95% of in-distribution (ties accepted). "
    "Intervals: percentile bootstrap 95%."
)


@dataclass
class RunAnalysis:
    """What one run contributes: its summary section and the arrays its figures need."""

    section: dict
    bpd_groups: list[tuple[str, np.ndarray]]
    roc: dict[str, list[tuple[str, np.ndarray, np.ndarray, float]]]
    decomposition: pd.DataFrame
    training: pd.DataFrame | None
    #: (label, images, per-pixel log P maps) for models that have them (PixelCNN++)
    pixel_maps: list | None = None


@dataclass
class ReportResult:
    out: Path
    files: dict[str, Path]
    summary: dict
    rows: list[dict]
    gates: list[GateResult] = field(default_factory=list)
    step_summary: str = ""  # Markdown without images, for $GITHUB_STEP_SUMMARY

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]


def jsonable(obj):
    """A copy with NaN/inf as None and numpy scalars as Python ones (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()  # numpy scalar
    if obj is None or obj is pd.NA:
        return None
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run_names(runs: list[RunDir]) -> list[str]:
    """Short, unique names: the folder name, with its parent's when two folders share it."""
    names = [rd.root.name or str(rd.root) for rd in runs]
    out = []
    for rd, name in zip(runs, names, strict=True):
        if names.count(name) > 1:
            name = f"{rd.root.parent.name}/{name}"
        while name in out:
            name += "'"
        out.append(name)
    return out


def _finite_mean(v: np.ndarray) -> float:
    f = v[np.isfinite(v)]
    return float(f.mean()) if f.size else math.nan


def _finite_std(v: np.ndarray) -> float:
    f = v[np.isfinite(v)]
    return float(f.std(ddof=1)) if f.size > 1 else math.nan


def verdict(row: dict) -> str:
    """A few words on one metric row (AUROC below 0.5 is the paper's paradox)."""
    auroc, lo, hi = row["auroc"], row["auroc_ci_low"], row["auroc_ci_high"]
    if auroc < 0.5:
        words = ("paradox: model prefers OOD" if row.get("detector", DEFAULT_DETECTOR)
                 == DEFAULT_DETECTOR else "inverted: scores OOD as more in-distribution")
    else:
        words = "detects OOD" if auroc >= 0.9 else "weak"
    if np.isfinite(lo) and lo <= 0.5 <= hi:
        words += " (CI includes chance)"
    return words


def analyse_run(rd: RunDir, name: str, *, n_boot: int = ReportConfig.n_boot,
                seed: int = ReportConfig.seed) -> RunAnalysis:
    """Load one run's scores and compute everything its report section shows."""
    df, meta = tables.load_run_scores(rd)
    where = f"scores of {rd.root}"
    ref = tables.reference_rows(df, where)
    sets = tables.ood_sets(df)
    if not sets:
        raise UserError(f"{where} hold no OOD set: run ood-audit score {rd.root} --ood mnist")
    notes: list[str] = []
    scores = detector_scores(df, meta)
    rows, roc = [], {}
    bpd_in = ref["bpd"].to_numpy(float)
    for det, s in scores.items():
        s_in = s.loc[ref.index].to_numpy(float)
        keep_in = ~np.isnan(s_in)
        if not keep_in.any():
            raise UserError(f"{where}: every in-distribution test score of {det} is NaN; rescore")
        if not keep_in.all():
            notes.append(f"{det}: {int((~keep_in).sum())} NaN in-distribution test "
                         "score(s) left out")
        roc[det] = []
        for oset in sets:
            s_ood = s.loc[oset.rows.index].to_numpy(float)
            keep = ~np.isnan(s_ood)
            if not keep.any():
                raise UserError(f"{where}: OOD set {oset.label} has no usable {det} scores "
                                "(empty or all NaN); rescore it")
            if not keep.all():
                notes.append(f"{det}: {int((~keep).sum())} NaN score(s) of {oset.label} left out")
            m = ood_metrics(s_in[keep_in], s_ood[keep], n_boot=n_boot, seed=seed)
            bpd_ood = oset.rows["bpd"].to_numpy(float)
            row = {"run": name, "detector": det, "ood_set": oset.label, "dataset": oset.dataset,
                   "transform": oset.transform, **m,
                   "mean_bpd_in": _finite_mean(bpd_in), "mean_bpd_ood": _finite_mean(bpd_ood),
                   "published": published_for(det, meta.in_dataset, oset.dataset,
                                              oset.transform)}
            row["bpd_gap"] = row["mean_bpd_ood"] - row["mean_bpd_in"]
            row["verdict"] = verdict(row)
            rows.append(row)
            fpr, tpr = roc_points(s_in[keep_in], s_ood[keep])
            roc[det].append((oset.label, fpr, tpr, m["auroc"]))
    rows = mark_best(rows, [o.label for o in sets])
    group_rows, bpd_groups = [], []
    for (dataset, role, split, transform), g in tables.groups(df):
        bpd, lpx = g["bpd"].to_numpy(float), g["log_px"].to_numpy(float)
        label = tables.group_label(dataset, role, split, transform)
        bpd_groups.append((label, bpd))
        group_rows.append({
            "label": label, "dataset": dataset, "role": role, "split": split,
            "transform": transform, "n": int(len(g)), "n_nonfinite": int((~np.isfinite(lpx)).sum()),
            "mean_bpd": _finite_mean(bpd), "std_bpd": _finite_std(bpd),
            "mean_log_px": _finite_mean(lpx), "std_log_px": _finite_std(lpx),
        })
    table = decompose(df, meta)
    training = _read_optional(rd.metrics)
    over = next((t for t in (_read_optional(rd.root / f) for f in OVER_TRAINING_FILES)
                 if t is not None), None)
    section = {
        "name": name, "path": str(rd.root), "model": meta.model, "in_dataset": meta.in_dataset,
        "version": meta.version, "checkpoint_sha256": meta.checkpoint_sha256,
        "dequant_seed": meta.dequant_seed, "run_config": meta.run_config,
        "adaptations": meta.adaptations, "extra": meta.extra,
        "reference": tables.group_label(ref["dataset"].iloc[0], "in", "test", "none"),
        "detectors": [_legend(d) for d in scores],
        "sets": group_rows, "metrics": rows,
        "decomposition": table.to_dict(orient="records"),
        "gaps": [{**{k: getattr(g, k) for k in ("label", "reference", "log_px", "bpd",
                                                 "carrier", "share")},
                  "components": g.components, "sentence": g.sentence()} for g in gaps(table)],
        "typicality_batches": (typicality_batches(df, ref, sets, seed=seed)
                               if "typicality" in scores else None),
        "training_curve": None if training is None else training.to_dict(orient="records"),
        "over_training": None if over is None else over.to_dict(orient="records"),
        "second_order": _read_second_order(rd),  # decompose --second-order, or None
        "contrast_sweep": contrast_sweep(df),  # None without contrast=ALPHA rows
        "ensemble": ensemble_aurocs(df, ref, sets),  # None without an ensemble
        "notes": notes,
    }
    return RunAnalysis(section, bpd_groups, roc, table, training,
                       load_pixel_maps(rd.pixel_maps))


def _legend(name: str) -> dict:
    """A detector as the report's legend shows it: its docstring's formula and paper, and
    the AUROCs its paper reports (:mod:`ood_audit.analysis.detectors.base`)."""
    det = DETECTORS.get(name)
    if det is None:
        return {"name": name, "summary": "precomputed score column", "paper": "", "published": []}
    return {"name": name, "summary": det.summary, "paper": det.paper,
            "published": [dataclasses.asdict(p) for p in det.published]}


def published_for(detector: str, in_dataset: str, ood: str, transform: str = "none") -> list[dict]:
    """The AUROCs the detector's paper reports for this pairing (in-distribution -> OOD
    set, untransformed), to set beside ours; [] when none is recorded."""
    det = DETECTORS.get(detector)
    if det is None or transform != "none":
        return []
    return [dataclasses.asdict(p) for p in det.published
            if p.in_dataset == in_dataset and p.ood == ood]


def mark_best(rows: list[dict], order: list[str]) -> list[dict]:
    """Rows grouped by OOD set (in ``order``), each with ``best``: True for the detector(s)
    with the highest AUROC on that set when there are several detectors."""
    out = []
    for label in order:
        group = [r for r in rows if r["ood_set"] == label]
        aurocs = [r["auroc"] for r in group if r["auroc"] is not None and np.isfinite(r["auroc"])]
        top = max(aurocs) if aurocs else None
        for r in group:
            out.append({**r, "best": len(group) > 1 and top is not None and r["auroc"] == top})
    return out


def typicality_batches(df: pd.DataFrame, ref: pd.DataFrame, sets: list,
                       seed: int = 0) -> dict | None:
    """The batch typicality test (Nalisnick et al. 2019b) per OOD set and batch size M,
    with H_hat and the bootstrap threshold from the in-distribution train rows; None when
    the scores hold no train rows."""
    train = typicality.entropy_rows(df)
    if len(train) < 2:
        return None
    ood = {o.label: o.rows["log_px"].to_numpy(float) for o in sets}
    ood = {k: v[np.isfinite(v)] for k, v in ood.items()}
    ref_lp = ref["log_px"].to_numpy(float)
    ref_lp = ref_lp[np.isfinite(ref_lp)]
    if ref_lp.size == 0 or not all(v.size for v in ood.values()):
        return None
    return {"entropy_nats": typicality.entropy_estimate(train), "n_train": int(len(train)),
            "alpha": typicality.ALPHA, "n_batches": typicality.N_BATCHES,
            "rows": typicality.batch_table(train.to_numpy(float), ref_lp, ood, seed=seed)}


def _read_second_order(rd: RunDir) -> dict | None:
    """``RUN/second_order.json`` (decompose --second-order) or None; unreadable is a UserError."""
    if not rd.second_order.exists():
        return None
    try:
        return json.loads(rd.second_order.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {rd.second_order} ({exc}); rerun ood-audit decompose "
                        "--second-order") from None


def ensemble_aurocs(df: pd.DataFrame, ref: pd.DataFrame, sets: list) -> dict | None:
    """Per OOD set, the AUROC of log p(x) under each member, the mean of those AUROCs, and
    the AUROC of the ensemble's log mean density ``log_px_ensemble`` (Nalisnick et al.
    2019: ensembling does not close the gap); None when the scores hold no ensemble."""
    if ENSEMBLE_COLUMN not in df.columns:
        return None
    columns = {f"member {i}": c for i, c in enumerate(["log_px", *member_columns(df.columns)])}
    columns["ensemble"] = ENSEMBLE_COLUMN

    def auroc(column: str, rows: pd.DataFrame) -> float:
        a, b = ref[column].to_numpy(float), rows[column].to_numpy(float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        return ood_metrics(a, b, n_boot=0)["auroc"] if a.size and b.size else math.nan

    out = []
    for oset in sets:
        row = {"ood_set": oset.label, **{name: auroc(c, oset.rows) for name, c in columns.items()}}
        members = [row[name] for name in columns if name.startswith("member ")]
        row["members_mean"] = float(np.mean(members))
        out.append(row)
    return {"members": [n for n in columns if n.startswith("member ")], "rows": out}


def _read_optional(path: Path) -> pd.DataFrame | None:
    """A side table (metrics.parquet, over_training.*) or None; unreadable is a UserError."""
    if not path.exists():
        return None
    try:
        return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a damaged file
        raise UserError(
            f"{path} is not readable ({type(exc).__name__}); delete or rewrite it") from None


def figures_for(a: RunAnalysis) -> dict[str, bytes]:
    """PNG figures of one run, keyed ``<run>/<figure>``."""
    name = a.section["name"]
    model = a.section["model"]
    # One colour per data set group in every figure: the histogram's order.
    colors = {label: plots.color_for(i) for i, (label, _) in enumerate(a.bpd_groups)}
    for s in a.section["sets"]:
        colors.setdefault(tables.set_label(s["dataset"], s["transform"]), colors[s["label"]])
    figs = {f"{name}/hist": plots.bpd_histogram(
        a.bpd_groups, f"{model} trained on {a.section['in_dataset']}: bits/dim", colors)}
    figs[f"{name}/roc"] = plots.roc_grid(a.roc, f"ROC curves per detector ({name})", colors)
    bars = plots.decomposition_bars(a.decomposition, f"Which term moves log p(x)? ({name})",
                                    colors)
    if bars is not None:
        figs[f"{name}/decomposition"] = bars
    if a.training is not None:
        curve = plots.training_curve(a.training, f"Training curve ({name})")
        if curve is not None:
            figs[f"{name}/training"] = curve
    if a.section.get("contrast_sweep"):
        figs[f"{name}/contrast"] = plots.contrast_sweep(
            a.section["contrast_sweep"], f"Mean bits/dim vs contrast factor ({name})", colors)
    if a.pixel_maps:
        figs[f"{name}/pixel-maps"] = plots.pixel_heatmaps(
            f"Per-pixel likelihood ({name}): image, then -log2 P per pixel", a.pixel_maps)
    return figs


def build_report(runs: list[RunDir], out: Path,
                 formats: list[str] | tuple[str, ...] = ("html", "md", "json"),
                 gates: list[Gate | str] = (), *, n_boot: int = ReportConfig.n_boot,
                 seed: int = ReportConfig.seed) -> ReportResult:
    """Analyse ``runs``, write the requested formats into ``out``, evaluate ``gates``.

    Gates are parsed and checked against the data before anything is written, so a bad
    gate (UserError) leaves no half report; a failing gate is reported in the files
    and in ``ReportResult.gates`` (the caller decides the exit code).
    """
    if not runs:
        raise UserError("no run to report on: pass one or more run directories")
    formats = list(formats)
    parsed = [g if isinstance(g, Gate) else parse_gate(g) for g in gates]
    names = run_names(runs)
    analyses = [analyse_run(rd, n, n_boot=n_boot, seed=seed)
                for rd, n in zip(runs, names, strict=True)]
    rows = [r for a in analyses for r in a.section["metrics"]]
    results = evaluate_gates(parsed, rows)
    out = Path(out)
    summary = {
        "tool": "ood-audit", "version": __version__,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "convention": CONVENTION, "metrics_defined": METRICS,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": 0.95},
        "runs": [a.section for a in analyses], "metrics": rows,
        "gates": [{"expr": r.gate.expr, "run": r.run, "dataset": r.gate.dataset,
                   "detector": r.gate.detector, "metric": r.gate.metric, "op": r.gate.op,
                   "bound": r.gate.bound, "value": r.value, "passed": r.passed,
                   "detail": r.detail} for r in results],
        "gates_passed": all(r.passed for r in results),
    }
    summary = jsonable(summary)
    files: dict[str, Path] = {}
    # Figures are the slow part (matplotlib): only drawn for a format that shows them.
    drawn = "html" in formats or "md" in formats
    figs = {k: v for a in analyses for k, v in figures_for(a).items()} if drawn else {}
    if drawn:  # no run prefix: it spans every run (a run's figures are "<run>/...")
        figs[render.OVERVIEW_FIGURE] = plots.auroc_overview(
            rows, "AUROC per detector and OOD set (in-distribution positive)")
    if "html" in formats:
        files["html"] = out / REPORT_FORMATS["html"]
        atomic_write_text(files["html"], html_page.render_html(summary, figs))
    if "md" in formats:
        fig_paths = {}
        for key, png in figs.items():
            rel = Path("figures") / (render.slug(key) + ".png")
            atomic_write_bytes(out / rel, png)
            fig_paths[key] = rel.as_posix()
        files["md"] = out / REPORT_FORMATS["md"]
        atomic_write_text(files["md"], render.render_markdown(summary, fig_paths))
    if "json" in formats:
        files["json"] = out / REPORT_FORMATS["json"]
        atomic_write_text(files["json"], json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return ReportResult(out, files, summary, rows, results,
                        render.render_markdown(summary, None))


def append_step_summary(path: Path, markdown: str, limit: int = STEP_SUMMARY_LIMIT) -> int:
    """Append ``markdown`` to a GitHub job summary file, keeping the file under ``limit``.

    When the text does not fit, it is cut at a line boundary and a note says where the
    full report is. Returns the number of bytes appended.
    """
    path = Path(path)
    used = path.stat().st_size if path.exists() else 0
    note = ("\n\n_(ood-audit: summary truncated to stay under GitHub's 1 MiB limit; "
            "see report.md)_\n")
    budget = limit - 1 - used
    data = markdown.encode("utf-8")
    if len(data) > budget:
        room = max(budget - len(note.encode()), 0)
        cut = data[:room]
        cut = cut[: cut.rfind(b"\n") + 1] if b"\n" in cut else b""
        data = cut + note.encode() if budget >= len(note.encode()) else b""
    with open(path, "ab") as fh:
        fh.write(data)
    return len(data)
