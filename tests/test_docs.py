"""docs/cli.md and docs/detectors.md are generated (scripts/gen_docs.py) from the Typer app
and the detector registry; this fails when either is stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from ood_audit.analysis.detectors import DETECTORS
from ood_audit.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_current():
    gen = _generator()
    for key, text in {"cli": gen.cli_markdown(), "detectors": gen.detectors_markdown()}.items():
        path = gen.PAGES[key]
        assert path.exists() and path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run python scripts/gen_docs.py")


def test_docs_name_every_command_option_and_detector():
    cli = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name, cmd in typer.main.get_command(app).commands.items():
        assert f"## ood-audit {name}" in cli
        subcommands = getattr(cmd, "commands", {}) or {}  # ood-audit import KIND
        for sub_name, command in [(name, cmd), *((f"{name} {k}", c) for k, c in subcommands.items())]:
            assert f"## ood-audit {sub_name}" in cli
            for p in command.params:
                if p.param_type_name == "option" and not p.hidden:
                    assert f"`{p.opts[0]}`" in cli, (sub_name, p.opts)
    detectors = (ROOT / "docs" / "detectors.md").read_text(encoding="utf-8")
    for name, det in DETECTORS.items():
        assert f"## `{name}`" in detectors and det.paper.split(",")[0] in detectors
