"""The Python API: ``from ood_audit import audit`` (ood_audit/api).

Scores go through the CLI's own scoring call, so an audit of a run equals ``ood-audit
score``'s table and an audit of the same model from memory gives the same numbers; a
module's log p(x) is its own log_prob on the x the scorer dequantized, plus the input
range's change of variables; each example flow of examples/flows is audited end to end.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import blobs
from torch import nn

from ood_audit import audit
from ood_audit.api.data import as_image_set
from ood_audit.api.wrap import INPUT_RANGES
from ood_audit.errors import UserError
from ood_audit.scoring.noise import dequantize_chunk
from ood_audit.scoring.schema import FIXED_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "flows"
pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning")


class Gaussian(nn.Module):
    """A plain module: log_prob(y) of a per-pixel normal with a learnable mean."""

    def __init__(self):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(0.2))

    def log_prob(self, y):
        return (-0.5 * ((y - self.mean) ** 2 + math.log(2 * math.pi))).flatten(1).sum(1)


def _flat(n: int = 40, value: int = 200, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(value, 4, (n, 8, 8)), 0, 255).astype(np.uint8)


def _x(images: torch.Tensor, name: str, split: str = "test", seed: int = 0) -> torch.Tensor:
    """The dequantized x the scorer gives the model (one noise chunk, seeded by set)."""
    return dequantize_chunk(images, 0, seed, zlib.crc32(f"{name}|{split}|none".encode()))


def test_import_ood_audit_stays_light():
    probe = ("import json, sys\nfrom ood_audit import audit, __version__\n"
             "print(json.dumps([m for m in ('torch', 'pandas') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert json.loads(out.stdout) == []


def test_audit_a_module_on_arrays(tmp_path):
    module = Gaussian()
    inside = blobs(48)  # [N, H, W]
    bright = torch.from_numpy(_flat(24)).unsqueeze(1)  # [N, C, H, W] tensor, labelled
    notes: list[str] = []
    res = audit(module, inside, ood=[_flat(32, value=120)[..., None], ("bright", bright)],
                detectors=["likelihood", "typicality"], train_limit=16, device="cpu",
                out=tmp_path / "audit", notify=notes.append)
    df = res.scores
    assert list(df.columns[:len(FIXED_COLUMNS)]) == list(FIXED_COLUMNS)
    assert df.groupby(["dataset", "split"]).size().to_dict() == {
        ("in-array", "test"): 48, ("in-array", "train"): 16, ("ood-array0", "test"): 32,
        ("bright", "test"): 24}
    assert res.meta.model == "python" and res.meta.terms == ["log_prob"]
    assert np.allclose(df["log_prob"], df["log_px"])
    assert np.allclose(df["bpd"], -(df["log_px"] - 64 * math.log(256)) / (64 * math.log(2)))
    # log p(x) is the module's own log_prob on the x the scorer dequantized
    ref = df[(df.dataset == "in-array") & (df.split == "test")]
    x = _x(torch.from_numpy(inside).unsqueeze(1), "in-array")
    with torch.no_grad():
        np.testing.assert_allclose(ref["log_px"], module.log_prob(x).double(), rtol=1e-6)
    assert "score_typicality" in df.columns
    m = res.metrics
    assert sorted(zip(m.detector, m.ood_set, strict=True)) == sorted(
        (d, s) for d in ("likelihood", "typicality") for s in ("ood-array0", "bright"))
    assert {"auroc", "auroc_ci_low", "auroc_ci_high", "aupr_in", "aupr_out", "fpr95"} <= set(m)
    # the module's mean (0.2) sits near the dark blobs: bright sets are less likely
    assert (m[m.detector == "likelihood"].auroc > 0.9).all()
    table = res.decomposition()
    assert len(table.attrs["gaps"]) == 2 and (tmp_path / "audit" / "decomposition.parquet").exists()
    rep = res.report(tmp_path / "report", gates=["bright:auroc>=0.9", "ood-array0:auroc<0.5"])
    assert (tmp_path / "report" / "report.html").exists()
    assert [g.passed for g in rep.gates] == [True, False] and not rep.passed
    # out= keeps a run directory the CLI reads like any other
    from ood_audit.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "audit"), "--format", "json"])
    assert exc.value.code == 0
    assert not module.training  # scored in eval mode


def test_a_temporary_run_goes_with_its_result():
    res = audit(Gaussian(), blobs(16), ood=[_flat(8)], detectors=["likelihood"], train_limit=0,
                device="cpu", notify=lambda m: None)
    run = res.run
    assert res.temporary and (run / "scores").is_dir()
    res.close()
    assert not run.exists()
    res = audit(Gaussian(), blobs(16), ood=[_flat(8)], detectors=["likelihood"], train_limit=0,
                device="cpu", notify=lambda m: None)
    run = res.run
    del res
    gc.collect()
    assert not run.exists()


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _library_log_prob(name: str, flow, y: torch.Tensor) -> torch.Tensor:
    """The library's own log-density of y (the flow's input space)."""
    if name == "normflows_glow":
        return flow.log_prob(y, None)
    if name == "zuko_nsf":
        return flow().log_prob(y.flatten(1))
    return flow.log_prob(y)


@pytest.mark.parametrize("name, library", [("normflows_glow", "normflows"),
                                           ("nflows_realnvp", "nflows"), ("zuko_nsf", "zuko")])
def test_each_example_flow_is_audited_end_to_end(name, library, tmp_path):
    pytest.importorskip(library)
    example = _example(name)
    flow = example.make((1, 8, 8))
    inside, ood = blobs(32), _flat(24)
    res = audit(flow, inside, ood=[ood], detectors=["likelihood"], train_limit=0, device="cpu",
                input_range=example.INPUT_RANGE, notify=lambda m: None)
    df = res.scores
    assert res.meta.model == library
    a, b = INPUT_RANGES[example.INPUT_RANGE]
    x = _x(torch.from_numpy(inside).unsqueeze(1), "in-array")
    with torch.no_grad():
        own = _library_log_prob(name, flow, a * x + b).double() + 64 * math.log(a)
    ref = df[df.dataset == "in-array"]
    np.testing.assert_allclose(ref["log_px"], own, rtol=1e-5)
    input_term = df["logdet_input"] if "logdet_input" in df else 0.0
    np.testing.assert_allclose(df["log_pz"] + df["logdet"] + input_term, df["log_px"], rtol=1e-9)
    assert res.metrics.shape[0] == 1
    assert res.decomposition().attrs["gaps"]
    assert res.report(tmp_path / "report", formats="json").files["json"].exists()


def test_a_run_audits_as_score_does_and_its_model_from_memory_gives_the_same(
        tmp_path, tiny_run, tiny_data, tiny_ood):
    from ood_audit.checkpoint import load_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # scored in place: never the shared fixture
    options = dict(detectors=["likelihood"], limit=40, train_limit=0, device="cpu",
                   notify=lambda m: None)
    from_run = audit(run, ood=[str(tiny_ood)], **options)
    assert from_run.run == run and (run / "scores").is_dir() and not from_run.temporary
    model, _ = load_checkpoint(run / "model.safetensors")
    from_memory = audit(model, str(tiny_data), ood=[str(tiny_ood)], **options)
    a, b = from_run.scores, from_memory.scores
    assert list(a.columns) == list(b.columns) and a["dataset"].tolist() == b["dataset"].tolist()
    np.testing.assert_allclose(a["log_px"], b["log_px"], rtol=1e-6)
    assert from_run.meta.checkpoint_sha256 != from_memory.meta.checkpoint_sha256  # file vs weights
    with pytest.raises(UserError, match="trained on"):
        audit(run, "mnist", ood=[str(tiny_ood)], **options)
    with pytest.raises(UserError, match="in place"):
        audit(run, ood=[str(tiny_ood)], out=tmp_path / "x", **options)
    with pytest.raises(UserError, match="holds a trained model"):
        audit(model, str(tiny_data), ood=[str(tiny_ood)], out=run, **options)


def test_arrays_take_every_layout_and_bad_input_is_one_line():
    gray = blobs(4)
    for array in (gray, gray[..., None], torch.from_numpy(gray).unsqueeze(1)):
        images = as_image_set(array, "x").images
        assert images.shape == (4, 1, 8, 8) and torch.equal(images[:, 0], torch.from_numpy(gray))
    rgb = blobs(2, channels=3)
    assert as_image_set(rgb, "x").shape == (3, 8, 8)
    with pytest.raises(UserError, match="uint8"):
        as_image_set(gray.astype(np.float32) / 255, "x")
    with pytest.raises(UserError, match="channel axis"):
        as_image_set(np.zeros((2, 5, 8, 8), np.uint8), "x")
    options = dict(detectors=["likelihood"], device="cpu", notify=lambda m: None)
    with pytest.raises(UserError, match="registered data set"):
        audit(Gaussian(), gray, ood=[("mnist", gray)], **options)
    with pytest.raises(UserError, match="unknown option 'batchsize'"):
        audit(Gaussian(), gray, ood=[gray], batchsize=8, **options)
    with pytest.raises(UserError, match="at least one OOD set"):
        audit(Gaussian(), gray, ood=[], **options)
    with pytest.raises(UserError, match="in_data"):
        audit(Gaussian(), None, ood=[gray], **options)
    with pytest.raises(UserError, match="takes a run directory, a DensityModel"):
        audit(object(), gray, ood=[gray], **options)
