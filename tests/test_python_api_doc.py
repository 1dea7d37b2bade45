"""docs/python-api.md's worked example runs: every ```python block, in order, in one
namespace, from a scratch folder (the example flows on the path as from the repository
root). Needs FashionMNIST and MNIST under OOD_AUDIT_DATA and the flow libraries (the
`flows` extra); skipped, visibly, otherwise."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python-api.md"
DATA = os.environ.get("OOD_AUDIT_DATA")
HAVE_DATA = bool(DATA) and all(
    (Path(DATA) / name / "raw" / "t10k-images-idx3-ubyte").exists()
    for name in ("MNIST", "FashionMNIST"))
pytestmark = [
    pytest.mark.realdata, pytest.mark.slow,
    pytest.mark.skipif(not HAVE_DATA, reason="OOD_AUDIT_DATA not set or without MNIST/FashionMNIST"),
    pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning"),
]


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", PAGE.read_text(encoding="utf-8"), re.S | re.M)


def test_the_page_has_a_worked_example():
    assert len(blocks()) >= 3 and "from ood_audit import audit" in blocks()[0]


def test_the_worked_example_runs(tmp_path, monkeypatch):
    for library in ("normflows", "nflows", "zuko"):
        pytest.importorskip(library)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "flows"))
    namespace: dict = {"__name__": "python_api_doc"}
    for i, code in enumerate(blocks()):
        exec(compile(code, f"{PAGE.name} block {i + 1}", "exec"), namespace)
    result, report = namespace["result"], namespace["report"]
    assert set(result.metrics["ood_set"]) == {"mnist", "noise-uniform"}
    assert report.passed and (tmp_path / "audit-report" / "report.html").exists()
    assert result.meta.model == "zuko" and "logdet_t0_autoregressive" in result.meta.terms
    assert result.metrics.set_index(["detector", "ood_set"]).loc[("likelihood", "mnist"), "auroc"] < 0.5
    assert (tmp_path / "audit-arrays" / "scores").is_dir()
