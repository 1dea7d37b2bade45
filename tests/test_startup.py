"""``ood-audit --help``, every command's ``--help`` and argument errors load no torch,
pandas or matplotlib: the command tree is light and the library is imported where the
work starts (start-up time: torch alone costs seconds on small machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "matplotlib")
PROBE = """
import json, sys
from ood_audit.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}), file=sys.stderr)
""".replace("HEAVY", repr(HEAVY))


def probe(*argv: str) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True,
                          text=True, timeout=120)
    *lines, last = proc.stderr.strip().splitlines()
    got = json.loads(last)
    return got["code"], got["heavy"], "\n".join(lines)


@pytest.mark.parametrize("argv", [["--help"], ["score", "--help"], ["train", "--help"],
                                  ["decompose", "--help"], ["report", "--help"],
                                  ["run", "--help"], ["--version"], ["import", "--help"],
                                  ["import", "python", "--help"], ["models", "--help"]])
def test_help_loads_no_heavy_module(argv):
    code, heavy, _ = probe(*argv)
    assert code == 0
    assert heavy == [], f"ood-audit {' '.join(argv)} imported {heavy}"


@pytest.mark.parametrize("argv", [["score", "--limit", "many"], ["train", "--nope"],
                                  ["report", "--n-boot"],
                                  # checked by the config dataclasses, before the library
                                  ["score", "--ood", "mnist", "--limit", "0"],
                                  ["report", "--format", "pdf"], ["train", "--seeds", "1",
                                                                  "--background"],
                                  ["import", "python", "mod.py", "--data", "mnist", "--out", "o"],
                                  ["import", "rosinality", "c.pt", "--n-flow", "0", "--n-block",
                                   "1", "--data", "mnist", "--out", "o"]])
def test_argument_errors_load_no_heavy_module(argv):
    code, heavy, err = probe(*argv)
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert heavy == [], f"ood-audit {' '.join(argv)} imported {heavy}"


def test_a_command_loads_the_library_when_its_work_starts(tmp_path):
    code, heavy, err = probe("score", str(tmp_path / "no-run"), "--ood", "mnist")
    assert code == 2 and "no-run" in err
    assert "torch" in heavy  # the check that the probe can see an import at all
