"""Which term of log p(x) carries the OOD likelihood gap (the paper's second question).

For a flow, log p(x) = log p(z) + log|det df/dx| (Nalisnick et al. 2019, Sec. 4). The
scores table holds every named term of the model (``meta.terms``, whose sum is
``log_px``); this module summarises each term per data set and compares every set with
the in-distribution test split. Nothing here knows Glow's names: term groups come from
:data:`ood_audit.scoring.schema.TERM_GROUPS` (``log_pz_level*``, ``logdet_level*``), and
a member named ``<prefix>{level}_{kind}`` (``logdet_level0_coupling``) also gives
per-level (``logdet_level0``) and per-layer-kind (``logdet_coupling``) sums. A model
with other terms (a VAE's ``recon``, ``neg_kl``) gets one row per term.

The table is long ("tidy"), one row per (data set group, term):

    dataset, role, split, transform, label, term, aggregate, top_level, group, level,
    layer_kind, unit, mean, std, n, diff_vs_in, share_of_gap

- ``aggregate``: ``total`` (log_px, bpd), ``group`` (log_pz, logdet), ``term`` (a model
  term), ``level`` / ``layer_kind`` (derived sums within a group).
- ``top_level``: the terms that partition log_px (group totals + ungrouped terms); their
  diffs add up to the log_px diff, and :func:`carrier` picks among them.
- ``diff_vs_in``: mean minus the in-distribution test mean of the same term.
- ``share_of_gap``: ``diff_vs_in / diff_vs_in(log_px)``, NaN for bpd and when the log_px
  gap is zero. Shares of the top-level terms sum to 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..runs import atomic_path
from ..scoring.schema import TERM_GROUPS, ScoresMeta, pretty, totals_for
from .tables import group_label, groups, reference_rows

_MEMBER = re.compile(r"^(\d+)(?:_(.+))?$")  # after the group prefix: "0_actnorm" or "1"
_GAP_EPS = 1e-9


@dataclass(frozen=True)
class TermInfo:
    """One column the decomposition summarises and where it sits in the hierarchy."""

    name: str
    aggregate: str  # total | group | term | level | layer_kind
    group: str | None = None
    level: int | None = None
    layer_kind: str | None = None

    @property
    def top_level(self) -> bool:
        return self.aggregate == "group" or (self.aggregate == "term" and self.group is None)

    @property
    def unit(self) -> str:
        return "bits/dim" if self.name == "bpd" else "nats"


def _member(name: str, group: str) -> re.Match | None:
    """``name``'s level and layer kind after its group's prefix (``logdet_level0_coupling``);
    None for a member of another form (an adapter's ``logdet_t3_coupling``)."""
    prefix = TERM_GROUPS[group]
    return _MEMBER.match(name[len(prefix):]) if name.startswith(prefix) else None


def term_columns(df: pd.DataFrame, meta: ScoresMeta) -> tuple[pd.DataFrame, list[TermInfo]]:
    """The value of every summarised term per row, and the terms' places, in display order.

    Group totals are read from ``df`` when the scorer wrote them, else summed here;
    per-level and per-kind sums are always derived (never stored twice in the table).
    """
    missing = [t for t in ["log_px", "bpd", *meta.terms] if t not in df.columns]
    if missing:
        raise UserError(f"scores lack term column(s) {', '.join(missing)}; rescore")
    values: dict[str, pd.Series] = {"log_px": df["log_px"], "bpd": df["bpd"]}
    infos = [TermInfo("log_px", "total"), TermInfo("bpd", "total")]
    totals = totals_for(meta.terms)
    derived: list[tuple[TermInfo, pd.Series]] = []
    for total, members in totals.items():
        values[total] = df[total] if total in df.columns else df[members].sum(axis=1)
        infos.append(TermInfo(total, "group", group=total))
        parsed = {}
        for name in members:
            m = _member(name, total)
            parsed[name] = (int(m.group(1)), m.group(2)) if m else (None, None)
        if any(kind for _, kind in parsed.values()):
            levels = sorted({lv for lv, _ in parsed.values() if lv is not None})
            kinds = list(dict.fromkeys(k for _, k in parsed.values() if k))
            for lv in levels:
                cols = [n for n, (lv2, _) in parsed.items() if lv2 == lv]
                derived.append((TermInfo(f"{total}_level{lv}", "level", total, level=lv),
                                df[cols].sum(axis=1)))
            for kind in kinds:
                cols = [n for n, (_, k) in parsed.items() if k == kind]
                derived.append((TermInfo(f"{total}_{kind}", "layer_kind", total, layer_kind=kind),
                                df[cols].sum(axis=1)))
    for name in meta.terms:
        group = next((g for g, members in totals.items() if name in members), None)
        level, kind = None, None
        if group is not None:
            m = _member(name, group)
            if m:
                level, kind = int(m.group(1)), m.group(2)
        infos.append(TermInfo(name, "term", group, level, kind))
        values[name] = df[name]
    for info, series in derived:
        if info.name in values:  # a model term already has this name: keep the model's
            continue
        infos.append(info)
        values[info.name] = series
    return pd.DataFrame(values, index=df.index).astype(float), infos


def decompose(df: pd.DataFrame, meta: ScoresMeta) -> pd.DataFrame:
    """The long decomposition table described in the module docstring.

    Raises UserError when the table has no in-distribution test rows (the baseline).
    """
    ref = reference_rows(df)
    values, infos = term_columns(df, meta)
    ref_mean = values.loc[ref.index].mean()
    records = []
    for (dataset, role, split, transform), rows in groups(df):
        v = values.loc[rows.index]
        mean, std, n = v.mean(), v.std(), v.count()
        gap = mean["log_px"] - ref_mean["log_px"]
        for info in infos:
            diff = mean[info.name] - ref_mean[info.name]
            share = (diff / gap if info.name != "bpd" and abs(gap) > _GAP_EPS else math.nan)
            records.append({
                "dataset": dataset, "role": role, "split": split, "transform": transform,
                "label": group_label(dataset, role, split, transform),
                "term": info.name, "aggregate": info.aggregate, "top_level": info.top_level,
                "group": info.group, "level": info.level, "layer_kind": info.layer_kind,
                "unit": info.unit, "mean": mean[info.name], "std": std[info.name],
                "n": int(n[info.name]), "diff_vs_in": diff, "share_of_gap": share,
            })
    table = pd.DataFrame.from_records(records)
    table["level"] = table["level"].astype("Int64")
    return table


@dataclass(frozen=True)
class Gap:
    """How one OOD group differs from the in-distribution test split (means, nats)."""

    label: str
    dataset: str
    split: str
    transform: str
    reference: str
    log_px: float
    bpd: float
    components: dict[str, float] = field(default_factory=dict)
    carrier: str = ""
    share: float = math.nan

    def sentence(self) -> str:
        """``mnist test vs fashionmnist test: log p(x) higher by 812 nats ...``."""
        if not np.isfinite(self.log_px):
            return f"{self.label} vs {self.reference}: log p(x) gap undefined (non-finite scores)"
        way = "higher" if self.log_px > 0 else "lower"
        size = abs(self.log_px)
        size_text = f"{size:,.0f}" if size >= 10 else f"{size:.2g}"
        # The reference is the untransformed test split; name a transformed set's transform.
        label = self.label if self.transform in ("", "none") or self.transform in self.label \
            else f"{self.label} [{self.transform}]"
        text = (f"{label} vs {self.reference}: log p(x) {way} by {size_text} "
                f"nats ({self.bpd:+.3f} bits/dim)")
        if self.carrier and np.isfinite(self.share):
            text += f"; {pretty(self.carrier)} carries {self.share:.0%} of the gap"
        elif self.carrier:
            text += f"; largest change in {pretty(self.carrier)}"
        return text


def carrier(components: dict[str, float], gap: float) -> tuple[str, float]:
    """The term carrying the log p(x) gap, and its share ``diff / gap``.

    Among the top-level terms (their diffs sum to ``gap``), the one whose diff goes
    furthest in the gap's direction (largest share; a share above 1 means the other
    terms partly cancel it). With no gap, the term with the largest absolute change
    and a NaN share. ``("", nan)`` when there are no components.
    """
    finite = {k: v for k, v in components.items() if np.isfinite(v)}
    if not finite:
        return "", math.nan
    if not np.isfinite(gap) or abs(gap) <= _GAP_EPS:
        return max(finite, key=lambda k: abs(finite[k])), math.nan
    name = max(finite, key=lambda k: finite[k] / gap)
    return name, finite[name] / gap


def gaps(table: pd.DataFrame) -> list[Gap]:
    """One :class:`Gap` per OOD group of a :func:`decompose` table, in table order."""
    ref = table[(table["role"] == "in") & (table["split"] == "test")
                & (table["transform"] == "none")]
    reference = ref["label"].iloc[0] if not ref.empty else "in-distribution test"
    out = []
    for label, rows in table[table["role"] == "ood"].groupby("label", sort=False):
        by_term = rows.set_index("term")
        comps = {t: float(by_term.at[t, "diff_vs_in"])
                 for t in by_term.index[by_term["top_level"].astype(bool)]}
        gap = float(by_term.at["log_px", "diff_vs_in"])
        name, share = carrier(comps, gap)
        first = rows.iloc[0]
        out.append(Gap(label, first["dataset"], first["split"], first["transform"], reference,
                       gap, float(by_term.at["bpd", "diff_vs_in"]), comps, name, share))
    return out


def write_decomposition(table: pd.DataFrame, path: Path) -> Path:
    """Write the table atomically: CSV when ``path`` ends in .csv, else Parquet."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False, engine="pyarrow")
    return path
