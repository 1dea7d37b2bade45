"""A report table as rows of strings, and the number formats every rendering shares.

The HTML page, the Markdown and the CLI's terminal tables all format these rows, so they
never disagree on a number. Imports nothing heavy: the CLI renders from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "figure"


def num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if round(x, digits) == 0:
            x = 0.0  # no "-0.000" for a difference that is zero up to rounding
        return f"{x:,.{digits}f}" if abs(x) < 1e6 else f"{x:.3g}"
    return str(x)


def pct(x: float) -> str:
    return f"{0.0 if round(x, 2) == 0 else x:.0%}"


class Interval(str):
    """An estimate with its interval, ``"0.487 [0.450, 0.524]"`` as text (Markdown, the
    terminal), with its parts kept (``point``, ``low``, ``high``) so the HTML can set the
    interval under the estimate and keep wide tables narrow."""

    point: str
    low: str
    high: str

    def __new__(cls, point: str, low: str, high: str) -> Interval:
        text = super().__new__(cls, f"{point} [{low}, {high}]")
        text.point, text.low, text.high = point, low, high
        return text


def with_ci(row: dict, metric: str) -> str:
    """``row[metric]`` with its 95% interval when the row has one (an :class:`Interval`)."""
    lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    text = num(row.get(metric))
    return Interval(text, num(lo), num(hi)) if lo is not None and hi is not None else text


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # one CSS class per row ("" for none)

    def add(self, cells: list, cls: str = "") -> None:
        self.rows.append([c if isinstance(c, str) else num(c) for c in cells])
        self.classes.append(cls)


def md_table(t: Table) -> str:
    def cell(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) or " " for h in t.headers) + " |",
             "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"
