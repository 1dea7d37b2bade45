"""The report's figures, each returned as PNG bytes.

Built on matplotlib's object API with the Agg canvas (no pyplot): no global backend
switch, no window, safe in a CI job or a thread. Axes carry units: bits/dim for
likelihoods shown per dimension, nats for per-image terms.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..scoring.schema import pretty

_DPI = 100
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def _figure(width: float = 6.4, height: float = 4.0, ncols: int = 1):
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" text chunk: the bytes then depend only on the data, not the install.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def color_for(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def bpd_histogram(groups: list[tuple[str, np.ndarray]], title: str,
                  colors: dict[str, str] | None = None) -> bytes:
    """Density-normalised bits/dim histograms on shared bins (the paper's Figure 1 style).

    ``groups``: (label, bpd values) in display order; in-distribution train, test, then
    each OOD set. Non-finite values are left out (and counted in the legend).
    ``colors``: label -> colour, so a set keeps its colour across figures.
    """
    colors = colors or {}
    fig, (ax,) = _figure()
    clean = [(label, np.asarray(v, float)) for label, v in groups]
    finite = [v[np.isfinite(v)] for _, v in clean]
    pooled = np.concatenate([v for v in finite if v.size] or [np.zeros(1)])
    edges = np.histogram_bin_edges(pooled, bins=60)
    for i, ((label, v), f) in enumerate(zip(clean, finite, strict=True)):
        if not f.size:
            continue
        dropped = v.size - f.size
        extra = f", {dropped} non-finite" if dropped else ""
        text = f"{label} (mean {f.mean():.3f}, n={f.size}{extra})"
        c = colors.get(label, color_for(i))
        ax.hist(f, bins=edges, density=True, histtype="stepfilled", alpha=0.35,
                color=c, edgecolor=c, linewidth=1.2, label=text)
    ax.set_xlabel("bits/dim (lower = higher likelihood)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def _grid(n: int, ncols: int, panel_w: float, panel_h: float, extra_w: float = 0.6,
          extra_h: float = 0.9) -> tuple[Figure, list]:
    """A figure with ``n`` axes on a grid of ``ncols`` columns; the grid's unused cells
    are removed, so ``fig.axes`` holds exactly the ``n`` panels."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_w * ncols + extra_w, panel_h * nrows + extra_h), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def _outer_labels(axes: list, ncols: int) -> None:
    """Tick labels on the left column and on the lowest panel of each column only: the
    panels share their scales, so inner labels would repeat them."""
    n = len(axes)
    for i, ax in enumerate(axes):
        ax.tick_params(labelleft=i % ncols == 0, labelbottom=i + ncols >= n)


def draw_roc_grid(roc: dict[str, list[tuple[str, np.ndarray, np.ndarray, float]]], title: str,
                  colors: dict[str, str] | None = None, ncols: int = 3) -> Figure:
    """ROC curves as small multiples: one panel per detector, one line per OOD set.

    ``roc``: detector -> [(OOD set, fpr, tpr, auroc)]. Panels per detector, because a
    set keeps its colour in every figure of the report (histogram, decomposition), so
    the lines read alike in each panel, and a panel answers "what does this detector
    separate"; the AUROC overview compares detectors per set. Shared unit axes, the
    chance diagonal, AUROC in each panel's legend, set under the panel: curves below the
    diagonal (the paradox) fill the corner a legend would take. In-distribution is the
    positive class, so a curve below the diagonal means the detector ranks that set as
    more in-distribution than the real test data.
    """
    colors = colors or {}
    dets = list(roc)
    ncols = max(1, min(ncols, len(dets)))
    n_sets = max(len(curves) for curves in roc.values())
    # nearly square plots (an equal aspect would fight constrained layout over the legends)
    fig, axes = _grid(len(dets), ncols, 2.9, 2.9 + 0.14 * n_sets)
    _outer_labels(axes, ncols)
    for i, (ax, det) in enumerate(zip(axes, dets, strict=True)):
        ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1)
        for j, (label, fpr, tpr, auroc) in enumerate(roc[det]):
            ax.plot(fpr, tpr, color=colors.get(label, color_for(j + 2)), linewidth=1.6,
                    label=f"{label}  AUROC {auroc:.3f}")
        # a hair beyond [0, 1]: a curve along an edge (AUROC 0 or 1) is not hidden by a spine
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_title(det, fontsize=10)
        below_ticks = i + ncols >= len(dets)  # this panel shows its x tick labels
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1 if below_ticks else -0.03),
                  handlelength=1.2, frameon=False, borderaxespad=0)
    fig.supxlabel("false positive rate (OOD accepted)", fontsize=9)
    fig.supylabel("true positive rate (in-dist. accepted)", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def roc_grid(roc: dict[str, list[tuple[str, np.ndarray, np.ndarray, float]]], title: str,
             colors: dict[str, str] | None = None) -> bytes:
    """:func:`draw_roc_grid` as PNG bytes."""
    return _png(draw_roc_grid(roc, title, colors))


#: Dot colours of the AUROC overview, by what the interval says (legend text, colour).
OVERVIEW_CLASSES = {
    "prefers": ("AUROC < 0.5, CI excludes 0.5: ranks OOD as more in-distribution", "#c0392b"),
    "chance": ("CI includes 0.5", "#7f7f7f"),
    "separates": ("AUROC > 0.5, CI excludes 0.5", "#1f4e9c"),
}


def overview_class(auroc: float, low: float | None, high: float | None) -> str:
    """Which of :data:`OVERVIEW_CLASSES` a row is in (no interval: by the point alone)."""
    if low is not None and high is not None and low <= 0.5 <= high:
        return "chance"
    return "prefers" if auroc < 0.5 else "separates"


def draw_auroc_overview(rows: list[dict], title: str, ncols: int = 2) -> Figure:
    """Detector x OOD set at a glance: AUROC with its 95% interval, as a dot plot.

    One panel per OOD set, one row per detector (``run: detector`` when rows come from
    several runs); the interval as a bar, its numbers beside the panel, chance (0.5) as
    a dashed line with the side where the model prefers OOD shaded, and the best
    detector on the set (``row["best"]``) in bold with "(best)". A dot plot rather than
    a heatmap: the intervals are drawn, so overlap with 0.5 or between detectors shows.
    ``rows``: summary metric rows (``auroc``, ``auroc_ci_low``, ``auroc_ci_high``,
    ``detector``, ``ood_set``, ``run``, ``best``).
    """
    sets = list(dict.fromkeys(r["ood_set"] for r in rows))
    several = len({r.get("run") for r in rows}) > 1
    names = list(dict.fromkeys(_row_name(r, several) for r in rows))
    fig, axes = _grid(len(sets), ncols, 4.6, 0.34 * len(names) + 0.7, extra_h=1.1)
    y = {name: i for i, name in enumerate(names)}
    for ax, label in zip(axes, sets, strict=True):
        ax.axvspan(0, 0.5, color="#fdecea", zorder=0)
        ax.axvline(0.5, color="#555555", linestyle="--", linewidth=1.2, zorder=1)
        for r in (r for r in rows if r["ood_set"] == label):
            auroc, lo, hi = (_finite_or_none(r.get(k))
                             for k in ("auroc", "auroc_ci_low", "auroc_ci_high"))
            if auroc is None:
                continue
            row = y[_row_name(r, several)]
            color = OVERVIEW_CLASSES[overview_class(auroc, lo, hi)][1]
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [row, row], color=color, linewidth=2.2, solid_capstyle="butt",
                        clip_on=False)
            best = bool(r.get("best"))
            ax.plot([auroc], [row], "o", color=color, markersize=7 if best else 5.5,
                    markeredgecolor="black" if best else color, zorder=3, clip_on=False)
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
            # beside the panel (axes x > 1), so a number never covers a dot or a bar
            ax.text(1.03, row, f"{auroc:.3f}{ci}" + (" (best)" if best else ""),
                    transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=7.5,
                    fontweight="bold" if best else "normal", gid=f"value:{r['ood_set']}")
        ax.set_xlim(-0.02, 1.02)  # a dot at 0 or 1 stays whole
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "0.25", "0.5\nchance", "0.75", "1"])
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", color="#e6e6e6", linewidth=0.6)
        ax.set_title(f"OOD set: {label}", fontsize=10)
        ax.set_xlabel("AUROC (95% CI)", fontsize=8)
    handles = [Line2D([], [], color=c, marker="o", linewidth=2.2, label=text)
               for text, c in OVERVIEW_CLASSES.values()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7.5,
               frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def _finite_or_none(x) -> float | None:
    """A finite float or None (``n_boot=0`` leaves the interval NaN; JSON makes it None)."""
    return float(x) if x is not None and np.isfinite(x) else None


def _row_name(row: dict, several_runs: bool) -> str:
    return f"{row['run']}: {row['detector']}" if several_runs else row["detector"]


def auroc_overview(rows: list[dict], title: str) -> bytes:
    """:func:`draw_auroc_overview` as PNG bytes."""
    return _png(draw_auroc_overview(rows, title))


def decomposition_bars(table: pd.DataFrame, title: str,
                       colors: dict[str, str] | None = None) -> bytes | None:
    """Bars of each term's mean difference from in-distribution test, per set and level.

    One panel per term group (log p(z), log|det|): x = level (and the group total), one
    bar per data set. A model without term groups gets one panel of its top-level
    terms. Positive bars push that set's log p(x) above the in-distribution test mean.
    ``table`` is a :func:`~ood_audit.analysis.decomposition.decompose` table.
    """
    colors = colors or {}
    ref = (table["role"] == "in") & (table["split"] == "test") & (table["transform"] == "none")
    rows = table[~ref]
    labels = list(dict.fromkeys(rows["label"]))
    if not labels:
        return None
    panels: list[tuple[str, list[tuple[str, str]]]] = []  # (title, [(x label, term)])
    for group in [g for g in dict.fromkeys(table["group"].dropna())]:
        g = table[(table["group"] == group) & table["layer_kind"].isna()
                  & table["level"].notna()].drop_duplicates("term")
        cats = [(f"level {int(lv)}", term) for lv, term in
                sorted(zip(g["level"], g["term"], strict=True), key=lambda x: int(x[0]))]
        panels.append((pretty(group), cats + [("total", group)]))
    if not panels:
        tops = table[table["top_level"].astype(bool)].drop_duplicates("term")["term"]
        panels.append(("terms", [(pretty(t), t) for t in tops]))
    fig, axes = _figure(max(4.5, 3.6 * len(panels)), 4.4, ncols=len(panels))
    width = 0.8 / len(labels)
    for ax, (name, cats) in zip(axes, panels, strict=True):
        x = np.arange(len(cats))
        for i, label in enumerate(labels):
            sub = rows[rows["label"] == label].set_index("term")["diff_vs_in"]
            vals = [float(sub.get(term, np.nan)) for _, term in cats]
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width,
                   color=colors.get(label, color_for(i + 1)), label=label)
        ax.axhline(0, color="#333333", linewidth=0.8)
        ax.set_xticks(x, [c for c, _ in cats], fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("difference from in-dist. test (nats)")
    handles, names = axes[0].get_legend_handles_labels()
    # Below the panels, so it never hides a bar.
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4), fontsize=8)
    fig.suptitle(title)
    return _png(fig)


def training_curve(metrics: pd.DataFrame, title: str) -> bytes | None:
    """Bits/dim per epoch from ``metrics.parquet``: every ``*_bpd`` column (train_bpd,
    test_bpd, ...); None when the table has no epoch or bpd column."""
    cols = [c for c in metrics.columns if c.endswith("_bpd")]
    if "epoch" not in metrics.columns or not cols or metrics.empty:
        return None
    fig, (ax,) = _figure(5.6, 3.6)
    for i, col in enumerate(cols):
        ax.plot(metrics["epoch"], metrics[col], marker="o", markersize=3,
                color=color_for(i), label=col.removesuffix("_bpd"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits/dim")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def pixel_heatmaps(title: str, sets: list[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """Images and their per-pixel log-likelihood maps (PixelCNN++), one row per set.

    Every map shares one colour scale, in bits per pixel (-log2 P), so brighter means
    less likely; the in-distribution and OOD rows are directly comparable.
    """
    n = max(len(images) for _, images, _ in sets)
    fig = Figure(figsize=(1.4 * 2 * n + 1.0, 1.5 * len(sets) + 0.6), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(sets), 2 * n, squeeze=False)
    bits = [-maps / np.log(2) for _, _, maps in sets]
    vmax = max(float(np.nanmax(b)) for b in bits)
    im = None
    for r, ((label, images, _), b) in enumerate(zip(sets, bits, strict=True)):
        for j in range(n):
            ax_img, ax_map = axes[r, 2 * j], axes[r, 2 * j + 1]
            for ax in (ax_img, ax_map):
                ax.set_xticks([])
                ax.set_yticks([])
            if j >= len(images):
                ax_img.axis("off")
                ax_map.axis("off")
                continue
            img = images[j].transpose(1, 2, 0)
            ax_img.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0,
                          vmax=255)
            im = ax_map.imshow(b[j], cmap="magma", vmin=0, vmax=vmax)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="bits per pixel (-log2 P)")
    return _png(fig)


def contrast_sweep(records: list[dict], title: str,
                   colors: dict[str, str] | None = None) -> bytes | None:
    """Mean bits/dim against the contrast factor ALPHA, one line per data set.

    ``records``: :func:`~ood_audit.report.sweep.contrast_sweep` output (``set``,
    ``alphas``, ``mean_bpd``, ``monotone``). ALPHA = 1 is the untransformed set. The
    analysis of Nalisnick et al. (2019) predicts rising lines: less variance (ALPHA < 1),
    higher likelihood, fewer bits/dim. None when there is nothing to draw.
    """
    if not records:
        return None
    colors = colors or {}
    fig, (ax,) = _figure(5.6, 3.8)
    ax.axvline(1.0, color="#999999", linestyle=":", linewidth=1)
    for i, r in enumerate(records):
        ax.plot(r["alphas"], r["mean_bpd"], marker="o", markersize=4, linewidth=1.6,
                color=colors.get(r["set"], color_for(i)),
                label=f"{r['set']} (monotone: {r['monotone']})")
    ax.set_xlabel("contrast factor ALPHA (variance about x ALPHA^2; 1 = untransformed)")
    ax.set_ylabel("mean bits/dim (lower = higher likelihood)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)
