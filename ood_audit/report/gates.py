"""CI gates: ``DATASET[:DETECTOR]:METRIC OP BOUND`` checked against a report's numbers.

Examples: ``mnist:auroc>=0.9`` (detector ``likelihood``), ``mnist:likelihood:fpr95<0.2``,
``noise-uniform:auroc_ci_low>0.99``, ``cifar10[grayscale]:bpd_gap>0``.

- DATASET: an OOD set's label as the report shows it (``mnist``, ``svhn[grayscale]``).
- DETECTOR: a detector of :mod:`ood_audit.analysis.detectors`; ``likelihood`` if omitted.
- METRIC: one of :data:`GATE_METRICS`; ``bpd_gap`` is mean OOD bits/dim minus mean
  in-distribution test bits/dim (positive = OOD gets lower likelihood, as it should).
- OP: ``>=``, ``<=``, ``>``, ``<``. BOUND: a number.

A gate holds in a report when it holds for every run that has the set; a NaN value
fails. A malformed gate, or one naming an unknown set, detector or metric, is a
UserError (exit 2); a gate that does not hold is a failure (exit 1).
"""

from __future__ import annotations

import math
import operator
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..analysis.detectors import DEFAULT_DETECTOR
from ..analysis.metrics import METRICS
from ..errors import UserError
from ..runs import atomic_write_bytes

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}
GATE_METRICS: list[str] = (
    [*METRICS, "bpd_gap"]
    + [f"{m}_ci_{side}" for m in METRICS for side in ("low", "high")]
)
_EXPR = re.compile(r"^(?P<lhs>[^<>]+?)\s*(?P<op>>=|<=|>|<)\s*(?P<bound>[^<>]+?)\s*$")
_EXAMPLE = "e.g. 'mnist:auroc>=0.9' or 'mnist:likelihood:fpr95<0.2'"


@dataclass(frozen=True)
class Gate:
    expr: str
    dataset: str
    detector: str
    metric: str
    op: str
    bound: float

    def holds(self, value: float) -> bool:
        return not math.isnan(value) and OPS[self.op](value, self.bound)


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    run: str
    value: float
    passed: bool

    @property
    def detail(self) -> str:
        g = self.gate
        shown = "NaN" if math.isnan(self.value) else f"{self.value:.4f}"
        verdict = "holds" if self.passed else "fails"
        return (f"{self.run}: {g.dataset} {g.detector} {g.metric} = {shown}, "
                f"needs {g.op} {g.bound:g}: {verdict}")


def parse_gate(expr: str) -> Gate:
    """Parse one gate expression; UserError naming it when malformed."""
    m = _EXPR.match(expr.strip())
    if not m:
        raise UserError(f"bad gate {expr!r}: expected DATASET[:DETECTOR]:METRIC OP BOUND "
                        f"with OP one of >= <= > <, {_EXAMPLE}")
    parts = [p.strip() for p in m["lhs"].split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"bad gate {expr!r}: the left side must be DATASET:METRIC or "
                        f"DATASET:DETECTOR:METRIC, {_EXAMPLE}")
    dataset, detector, metric = (parts[0], DEFAULT_DETECTOR, parts[1]) if len(parts) == 2 else parts
    metric = metric.lower()
    if metric not in GATE_METRICS:
        raise UserError(f"gate {expr!r}: unknown metric {metric!r}; choose from "
                        f"{', '.join(GATE_METRICS)}")
    try:
        bound = float(m["bound"])
    except ValueError:
        bound = math.nan
    if math.isnan(bound):
        raise UserError(f"bad gate {expr!r}: bound {m['bound']!r} is not a number, {_EXAMPLE}")
    return Gate(expr.strip(), dataset, detector, metric, m["op"], bound)


def parse_gates(exprs: list[str] | None) -> list[Gate]:
    return [parse_gate(e) for e in exprs or []]


def evaluate_gates(gates: list[Gate], rows: list[dict]) -> list[GateResult]:
    """Check each gate on every run whose metric rows have its set and detector.

    ``rows``: one dict per (run, detector, OOD set) with keys ``run``, ``detector``,
    ``ood_set`` and every gate metric. Set and detector names match case-insensitively.
    Raises UserError when a gate names a set or detector no run has.
    """
    results = []
    sets = sorted({r["ood_set"] for r in rows})
    for gate in gates:
        on_set = [r for r in rows if r["ood_set"].lower() == gate.dataset.lower()]
        if not on_set:
            raise UserError(f"gate {gate.expr!r}: no OOD set {gate.dataset!r} in the report; "
                            f"choose from {', '.join(sets) or '(none scored)'}")
        hits = [r for r in on_set if r["detector"].lower() == gate.detector.lower()]
        if not hits:
            dets = sorted({r["detector"] for r in on_set})
            raise UserError(f"gate {gate.expr!r}: unknown detector {gate.detector!r} for "
                            f"{gate.dataset}; choose from {', '.join(dets)}")
        for r in hits:
            value = float(r.get(gate.metric, math.nan))
            results.append(GateResult(gate, r["run"], value, gate.holds(value)))
    return results


def write_junit(path: Path, results: list[GateResult]) -> Path:
    """A JUnit XML file with one testcase per gate and run, for CI test reporters."""
    failures = sum(not r.passed for r in results)
    suites = ET.Element("testsuites", name="ood-audit", tests=str(len(results)),
                        failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name="ood-audit gates",
                          tests=str(len(results)), failures=str(failures), errors="0")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"ood-audit.{r.run}", name=r.gate.expr)
        if not r.passed:
            fail = ET.SubElement(case, "failure", message=r.detail, type="GateFailed")
            fail.text = r.detail
    ET.indent(suites)
    atomic_write_bytes(path, ET.tostring(suites, encoding="utf-8", xml_declaration=True))
    return Path(path)
