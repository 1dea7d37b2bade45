"""The report's figures, each returned as PNG bytes.

Built on matplotlib's object API with the Agg canvas (no pyplot): no global backend
switch, no window, safe in a CI job or a thread. Axes carry units: bits/dim for
likelihoods shown per dimension, nats for per-image terms.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..analysis.decomposition import pretty

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


def roc_figure(curves: list[tuple[str, np.ndarray, np.ndarray, float]], title: str,
               colors: dict[str, str] | None = None) -> bytes:
    """ROC curves of one detector, one per OOD set: (label, fpr, tpr, auroc).

    In-distribution is the positive class, so a curve below the diagonal means the
    detector ranks that OOD set as more in-distribution than the real test data.
    """
    colors = colors or {}
    fig, (ax,) = _figure(5.2, 4.6)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="chance")
    for i, (label, fpr, tpr, auroc) in enumerate(curves):
        ax.plot(fpr, tpr, color=colors.get(label, color_for(i + 2)), linewidth=1.8,
                label=f"{label} (AUROC {auroc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (OOD accepted)")
    ax.set_ylabel("true positive rate (in-distribution accepted)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


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
