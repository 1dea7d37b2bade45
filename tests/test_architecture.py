"""The package's shape, checked: every import points down (no cycle between modules or
between subpackages), the CLI is thin (small functions; command modules share only the
options and the renderer), and each detector documents itself."""

from __future__ import annotations

import ast
from pathlib import Path

from ood_audit.analysis.detectors import DETECTORS

PKG = Path(__file__).resolve().parents[1] / "ood_audit"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (function-local imports too)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                prefix = ".".join((base[: len(base) - node.level + 1] if node.level else [])
                                  + ([node.module] if node.module else []))
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m and mods[t].name != "__init__.py":
                    edges[m].add(t)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules_or_subpackages():
    edges = _imports(_modules())
    assert _cycles(edges) == []
    group = lambda m: ".".join(m.split(".")[:2])  # noqa: E731 - ood_audit.<subpackage or module>
    packages: dict[str, set[str]] = {}
    for m, targets in edges.items():
        packages.setdefault(group(m), set()).update(group(t) for t in targets if group(t) != group(m))
    assert _cycles(packages) == []


def test_only_the_cli_imports_typer_and_nothing_imports_the_cli():
    mods = _modules()
    edges = _imports(mods)
    for m, f in mods.items():
        if not m.startswith("ood_audit.cli") and m != "ood_audit.__main__":  # the entry point
            assert "import typer" not in f.read_text(encoding="utf-8"), m
            assert not any(t.startswith("ood_audit.cli") for t in edges[m]), m


def test_cli_functions_are_short_and_commands_share_only_options_and_render():
    shared = {"ood_audit.cli.options", "ood_audit.cli.render"}
    edges = _imports(_modules())
    for m, f in _modules().items():
        if not m.startswith("ood_audit.cli."):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{m}.{node.name}"
        if m.endswith("_cmd"):
            assert {t for t in edges[m] if t.startswith("ood_audit.cli.")} <= shared, m


def test_every_detector_documents_formula_paper_and_needs():
    """Its score function's docstring is what --help, docs/detectors.md and the report
    show: a formula, a Paper: line and a Needs: line."""
    for name, det in DETECTORS.items():
        assert det.summary and det.paper, name
        assert "\nPaper:" in det.doc and "\nNeeds:" in det.doc, name
        assert det.needs, name
