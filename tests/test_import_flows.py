"""``ood-audit import python`` of a normflows, nflows or zuko flow, through the CLI: the
scores' log p(x) is the library's own ``log_prob`` of the y the module was given, plus
the input range's D log|a|, computed here with the library on the same dequantized x;
the adapter's ``log_pz`` and ``logdet`` totals add up to it. Each library is skipped,
visibly, when it is not installed (``pip install ood-audit[flows]``)."""

from __future__ import annotations

import math
import textwrap
import zlib

import pytest
import torch
from conftest import run_cli

from ood_audit.analysis.tables import load_run_scores
from ood_audit.checkpoint import load_checkpoint
from ood_audit.data.registry import load_dataset
from ood_audit.runs import RunDir
from ood_audit.scoring.noise import dequantized_chunks

pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning")
D = 64  # tiny_data: 1x8x8

#: library -> (module file, --input-range, a, b, how the library itself scores y [B, 1, 8, 8])
FLOWS = {
    "zuko": ("""
        import torch, zuko
        def make():
            torch.manual_seed(1)
            return zuko.flows.NSF(features=64, transforms=2, hidden_features=(16,))
        """, "-1,1", 2.0, -1.0, lambda flow, y: flow().log_prob(y.flatten(1))),
    "nflows": ("""
        import torch
        from nflows.flows import MaskedAutoregressiveFlow
        def make():
            torch.manual_seed(1)
            return MaskedAutoregressiveFlow(64, 16, num_layers=2, num_blocks_per_layer=1)
        """, "0,255", 256.0, 0.0, lambda flow, y: flow.log_prob(y.flatten(1))),
    "normflows": ("""
        import torch, normflows as nf
        def make():
            torch.manual_seed(1)
            flows = []
            for i in range(2):
                mask = (torch.arange(64) + i) % 2
                flows.append(nf.flows.MaskedAffineFlow(
                    mask, nf.nets.MLP([64, 16, 64], init_zeros=False),
                    nf.nets.MLP([64, 16, 64], init_zeros=False)))
            return nf.NormalizingFlow(nf.distributions.DiagGaussian(64), flows)
        """, "-0.5,0.5", 1.0, -0.5, lambda flow, y: flow.log_prob(y.flatten(1))),
}




@pytest.mark.parametrize("library", list(FLOWS))
def test_an_imported_flow_scores_the_librarys_own_log_prob(library, tmp_path, monkeypatch,
                                                            tiny_data, capsys):
    pytest.importorskip(library)
    monkeypatch.chdir(tmp_path)
    body, input_range, a, b, own_log_prob = FLOWS[library]
    src = tmp_path / f"{library}_flow.py"
    src.write_text(textwrap.dedent(body))
    argv = ["import", "python", f"{src}:make", "--input-range", input_range, "--data", tiny_data,
            "--out", "runs/f"]
    if library != "zuko":  # zuko's adapter flattens images itself; the others take [B, 64]
        argv += ["--input-shape", "64"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert f"adapter:{library}" in out
    code, _, err = run_cli(["score", "runs/f", "--ood", "noise-uniform", "--limit", "24",
                        "--train-limit", "0"], capsys)
    assert code == 0, err
    df, meta = load_run_scores(RunDir(tmp_path / "runs/f"))
    rows = df[(df.dataset == str(tiny_data)) & (df.split == "test")].sort_values("index")
    # the same x the scorer dequantized, scored by the library itself
    images = load_dataset(str(tiny_data), "test", limit=24).images
    key = zlib.crc32(f"{tiny_data}|test|none".encode())
    x = torch.cat([c for _, c in dequantized_chunks(images, 0, key)])
    flow = load_checkpoint(tmp_path / "runs/f/model.safetensors")[0].module.eval()
    with torch.no_grad():
        expected = own_log_prob(flow, a * x + b).double() + D * math.log(a)
    got = torch.tensor(rows["log_px"].to_numpy())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    assert meta.model == "imported" and "log_pz" in meta.terms
    assert any(t.startswith("logdet_t") for t in meta.terms)
    input_term = rows["logdet_input"] if a != 1 else 0.0
    torch.testing.assert_close(torch.tensor((rows["log_pz"] + rows["logdet"] + input_term).to_numpy()),
                               got, rtol=1e-6, atol=1e-4)
