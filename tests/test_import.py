"""``ood-audit import y0ast|rosinality``: a Glow trained elsewhere as a run that score,
decompose and report take; the sources' sha256 re-checked by every command that loads
the model; bad input one line, exit 2, nothing written.

Without a clone of a port, the y0ast checkpoints are made here: our Glow's state dict
written back in y0ast/Glow-PyTorch's key layout (the converter's inverse), so the round
trip must give our Glow's own log p(x). With ``OOD_AUDIT_Y0AST_PORT`` (and
``OOD_AUDIT_ROSINALITY_PORT``) naming a clone, a model built by the port's own code is
imported and scored and its bits/dim compared with the port's on the same images
(skipped, visibly, otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from ood_audit.analysis.tables import load_run_scores
from ood_audit.checkpoint import load_checkpoint
from ood_audit.data.registry import load_dataset
from ood_audit.models.glow import Glow, GlowConfig
from ood_audit.provenance import IMPORT_FILE
from ood_audit.runs import RunDir
from ood_audit.scoring.noise import dequantized_chunks

L, K, HIDDEN = 2, 2, 8
SHAPE = (1, 8, 8)
HPARAMS = {"K": K, "L": L, "hidden_channels": HIDDEN, "flow_coupling": "affine",
           "flow_permutation": "invconv", "LU_decomposed": True, "learn_top": True,
           "y_condition": False, "actnorm_scale": 1.0, "lr": 0.0005, "batch_size": 64,
           "dataset": "cifar10", "seed": 0}  # and the rest of its train.py's arguments






# ------------------------------------------------------------ y0ast layout, no clone
def our_glow(seed: int = 0) -> Glow:
    """A Glow the y0ast port can hold (no edge channel, plain ActNorm log-scales), off its
    init, with a top prior constant per channel (as y0ast's learned top is)."""
    torch.manual_seed(seed)
    model = Glow(GlowConfig(levels=L, steps=K, hidden=HIDDEN, coupling="affine", edge_bias=False,
                            actnorm_logscale=1.0), SHAPE)
    with torch.no_grad():
        model.data_init(torch.rand(16, *SHAPE))
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        top = model.priors[L - 1]
        top.mean.copy_(top.mean.mean((2, 3), keepdim=True).expand_as(top.mean))
        top.logs.copy_(top.logs.mean((2, 3), keepdim=True).expand_as(top.logs))
    return model.eval()


def to_y0ast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Glow's state dict in y0ast/Glow-PyTorch's layout (``model.py`` ``Glow``):
    FlowNet layers numbered squeeze, K steps, split per level."""
    out: dict[str, torch.Tensor] = {}
    for i in range(L):
        for k in range(K):
            src, dst = f"levels.{i}.{k}", f"flow.layers.{i * (K + 2) + 1 + k}"
            out[f"{dst}.actnorm.bias"] = state[f"{src}.actnorm.bias"]
            out[f"{dst}.actnorm.logs"] = state[f"{src}.actnorm.logs"]
            for ours, theirs in (("perm", "p"), ("sign_s", "sign_s"), ("lower", "lower"),
                                 ("upper", "upper"), ("log_s", "log_s")):
                out[f"{dst}.invconv.{theirs}"] = state[f"{src}.invconv.{ours}"]
            for j in (0, 2):
                net = f"{src}.coupling.nn.{j}"
                out[f"{dst}.block.{j}.conv.weight"] = state[f"{net}.weight"]
                out[f"{dst}.block.{j}.actnorm.bias"] = state[f"{net}.bias"]
                out[f"{dst}.block.{j}.actnorm.logs"] = state[f"{net}.logs"]
            zero = f"{src}.coupling.nn.4"
            out[f"{dst}.block.4.conv.weight"] = state[f"{zero}.weight"]
            out[f"{dst}.block.4.conv.bias"] = state[f"{zero}.bias"]
            out[f"{dst}.block.4.logs"] = state[f"{zero}.logs"].reshape(-1, 1, 1)
        if i < L - 1:
            split = f"flow.layers.{i * (K + 2) + 1 + K}.conv"
            out[f"{split}.conv.weight"] = state[f"priors.{i}.conv.weight"]
            out[f"{split}.conv.bias"] = state[f"priors.{i}.conv.bias"]
            out[f"{split}.logs"] = state[f"priors.{i}.conv.logs"].reshape(-1, 1, 1)
    mean, logs = state[f"priors.{L - 1}.mean"], state[f"priors.{L - 1}.logs"]
    c = mean.shape[1]
    out["learn_top_fn.conv.bias"] = torch.cat([mean[0, :, 0, 0], logs[0, :, 0, 0]])
    out["learn_top_fn.conv.weight"] = torch.randn(2 * c, 2 * c, 3, 3)  # multiplies zeros only
    out["learn_top_fn.logs"] = torch.zeros(2 * c, 1, 1)
    out["prior_h"] = torch.zeros(1, 2 * c, mean.shape[2], mean.shape[3])
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture()
def y0ast_files(tmp_path):
    model = our_glow()
    ckpt, hparams = tmp_path / "port" / "glow_model_3.pth", tmp_path / "port" / "hparams.json"
    ckpt.parent.mkdir()
    torch.save(to_y0ast(model.state_dict()), ckpt)
    hparams.write_text(json.dumps(HPARAMS, indent=4))
    return model, ckpt, hparams


def test_a_y0ast_checkpoint_is_audited_end_to_end(in_tmp, y0ast_files, tiny_data, tiny_ood, capsys):
    model, ckpt, hparams = y0ast_files
    code, out, err = run_cli(["import", "y0ast", ckpt, "--hparams", hparams, "--data", tiny_data,
                          "--out", "runs/y0"], capsys)
    assert code == 0, err
    assert "imported y0ast" in out and "as glow" in out
    record = json.loads((in_tmp / "runs/y0" / IMPORT_FILE).read_text())
    assert record["kind"] == "y0ast" and record["model"] == "glow"
    assert [s["role"] for s in record["sources"]] == ["checkpoint", "hparams"]
    assert record["input_shape"] == list(SHAPE) and record["data"] == str(tiny_data)
    assert (in_tmp / "runs/latest").read_text().strip().endswith("runs/y0")
    imported, info = load_checkpoint(in_tmp / "runs/y0/model.safetensors")
    x = torch.rand(8, *SHAPE)
    with torch.no_grad():  # the round trip: the port's layout converted back is our Glow
        torch.testing.assert_close(imported.log_prob(x), model.log_prob(x), rtol=1e-5, atol=1e-4)
    for argv in (["score", "runs/y0", "--ood", tiny_ood, "--ood", "noise-uniform", "--limit", "64",
                  "--train-limit", "32"], ["decompose", "runs/y0"],
                 ["report", "runs/y0", "--n-boot", "0", "--gate", "noise-uniform:auroc>=0"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 0, (argv, err)
    df, meta = load_run_scores(RunDir(in_tmp / "runs/y0"))
    assert meta.model == "glow" and "log_pz_level1" in meta.terms
    assert "logdet_level0_coupling" in df.columns and "logdet" in df.columns


def test_a_changed_or_missing_source_is_refused_by_every_command_that_loads_the_model(
        in_tmp, y0ast_files, tiny_data, capsys):
    _, ckpt, hparams = y0ast_files
    score = ["score", "runs/y0", "--ood", "noise-uniform", "--limit", "16", "--train-limit", "8"]
    assert run_cli(["import", "y0ast", ckpt, "--hparams", hparams, "--data", tiny_data,
                "--out", "runs/y0"], capsys)[0] == 0
    assert run_cli(score, capsys)[0] == 0
    scores = sorted((in_tmp / "runs/y0/scores").iterdir())
    before = [p.read_bytes() for p in scores]
    original = hparams.read_bytes()
    hparams.write_text(json.dumps({**HPARAMS, "lr": 0.001}))  # any byte counts
    for argv in (score, ["decompose", "runs/y0", "--second-order", "--second-order-limit", "8"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "has changed since" in err and str(hparams.resolve()) in err, err
    assert [p.read_bytes() for p in scores] == before  # the scores were left as they were
    hparams.write_bytes(original)
    code, _, err = run_cli(score, capsys)
    assert code == 0, err
    ckpt.rename(ckpt.with_suffix(".moved"))
    code, _, err = run_cli(score, capsys)
    assert code == 2 and "which is gone" in err and len(err.strip().splitlines()) == 1, err


def _bad(tmp: Path, name: str, content) -> Path:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    return path


def test_bad_checkpoints_and_options_are_one_line_exit_2_and_write_nothing(
        in_tmp, y0ast_files, tiny_data, capsys):
    model, ckpt, hparams = y0ast_files
    state = to_y0ast(model.state_dict())
    cases = {
        "missing checkpoint": ["import", "y0ast", in_tmp / "nope.pth", "--hparams", hparams],
        "missing hparams": ["import", "y0ast", ckpt, "--hparams", in_tmp / "nope.json"],
        "hparams not JSON": ["import", "y0ast", ckpt, "--hparams", _bad(in_tmp, "h.json", "{K: 1")],
        "wrong keys": ["import", "y0ast", _bad(in_tmp, "k.pth", {"x.weight": torch.zeros(2)}),
                       "--hparams", hparams],
        "a missing tensor": ["import", "y0ast", _bad(in_tmp, "m.pth", dict(list(state.items())[1:])),
                             "--hparams", hparams],
        "other hparams": ["import", "y0ast", ckpt, "--hparams",
                          _bad(in_tmp, "h3.json", json.dumps({**HPARAMS, "K": 3}))],
        "a pickled module": ["import", "y0ast", _bad(in_tmp, "p.pth", torch.nn.Linear(2, 2)),
                             "--hparams", hparams],
        "truncated": ["import", "y0ast", _bad(in_tmp, "t.pth", ckpt.read_bytes()[:100]),
                      "--hparams", hparams],
        "no hparams": ["import", "y0ast", ckpt],
        "synthetic data": ["import", "y0ast", ckpt, "--hparams", hparams, "--data", "noise-uniform"],
        "unknown option": ["import", "y0ast", ckpt, "--hparams", hparams, "--n-flow", "2"],
        "not rosinality": ["import", "rosinality", ckpt, "--n-flow", "2", "--n-block", "2"],
        "rosinality flags": ["import", "rosinality", ckpt, "--n-flow", "0", "--n-block", "2"],
        "unknown kind": ["import", "glowish", ckpt],
    }
    for why, argv in cases.items():
        extra = [] if "--data" in argv else ["--data", tiny_data]
        code, out, err = run_cli([*argv, *extra, "--out", "runs/bad"], capsys)
        assert code == 2, (why, out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (why, err)
        assert not (in_tmp / "runs").exists(), why  # nothing written, not even runs/latest
    assert run_cli(["import", "y0ast", ckpt, "--hparams", hparams, "--data", tiny_data,
                "--out", "runs/ok"], capsys)[0] == 0
    code, _, err = run_cli(["import", "y0ast", ckpt, "--hparams", hparams, "--data", tiny_data,
                        "--out", "runs/ok"], capsys)
    assert code == 2 and "already holds a run" in err


# ------------------------------------------------------------- the ports' own code
def _port(env: str, name: str):
    clone = os.environ.get(env)
    if not clone:
        pytest.skip(f"{env} names no clone of the {name} port")
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "reference_ports.py"
    spec = importlib.util.spec_from_file_location("_bench_reference_ports", bench)
    ports = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, ports)
    spec.loader.exec_module(ports)
    return ports.load_model_module(name, Path(clone))


def _same_images(data: str) -> torch.Tensor:
    """The in-distribution test images exactly as ``score`` dequantized them (seed 0)."""
    images = load_dataset(data, "test").images
    key = zlib.crc32(f"{data}|test|none".encode())
    return torch.cat([x for _, x in dequantized_chunks(images, 0, key)])


def _scored_bpd(run: Path, data: str) -> np.ndarray:
    df, _ = load_run_scores(RunDir(run))
    rows = df[(df["dataset"] == data) & (df["split"] == "test") & (df["transform"] == "none")]
    return rows.sort_values("index")["bpd"].to_numpy()


def test_a_y0ast_model_built_by_the_port_scores_its_own_bits_per_dim(in_tmp, tiny_data, capsys):
    m = _port("OOD_AUDIT_Y0AST_PORT", "y0ast")
    c, h, w = SHAPE
    torch.manual_seed(0)
    net = m.Glow((h, w, c), HIDDEN, K, L, 1.0, "invconv", "affine", True, 10, True, False)
    net.train()
    with torch.no_grad():
        net(torch.rand(32, *SHAPE) - 0.5, None)  # its ActNorm init, noise and all
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.eval()
    torch.save(net.state_dict(), in_tmp / "glow_model_1.pth")
    (in_tmp / "hparams.json").write_text(json.dumps(HPARAMS))
    assert run_cli(["import", "y0ast", in_tmp / "glow_model_1.pth", "--hparams", in_tmp / "hparams.json",
                "--data", tiny_data, "--out", "runs/y0"], capsys)[0] == 0
    code, _, err = run_cli(["score", "runs/y0", "--ood", "noise-uniform", "--train-limit", "0"], capsys)
    assert code == 0, err
    x, d = _same_images(str(tiny_data)), math.prod(SHAPE)
    with torch.no_grad():  # the port's forward without the noise it adds itself
        z, objective = net.flow(x - 0.5, logdet=torch.zeros(len(x)))
        mean, logs = net.prior(x)
        log_px = objective + m.gaussian_likelihood(mean, logs, z)
    port = (-(log_px.double() - d * math.log(256)) / (d * math.log(2))).numpy()
    ours = _scored_bpd(in_tmp / "runs/y0", str(tiny_data))
    assert abs(ours.mean() - port.mean()) < 0.002
    np.testing.assert_allclose(ours, port, atol=1e-4)


def test_a_rosinality_model_built_by_the_port_scores_its_own_bits_per_dim(in_tmp, tiny_data, capsys):
    m = _port("OOD_AUDIT_ROSINALITY_PORT", "rosinality")
    m.AffineCoupling.__init__.__defaults__ = (HIDDEN, True)
    torch.manual_seed(0)
    net = torch.nn.DataParallel(m.Glow(1, K, L, affine=True, conv_lu=True))  # as its train.py
    with torch.no_grad():
        net.module(torch.rand(32, *SHAPE) - 0.5)  # ActNorm init
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(net.state_dict(), in_tmp / "model_000001.pt")
    assert run_cli(["import", "rosinality", in_tmp / "model_000001.pt", "--n-flow", K, "--n-block", L,
                "--affine", "--data", tiny_data, "--out", "runs/r"], capsys)[0] == 0
    code, _, err = run_cli(["score", "runs/r", "--ood", "noise-uniform", "--train-limit", "0"], capsys)
    assert code == 0, err
    x, d = _same_images(str(tiny_data)), math.prod(SHAPE)
    with torch.no_grad():
        log_p, logdet, _ = net.module(x - 0.5)
    port = (-((log_p + logdet).double() - d * math.log(256)) / (d * math.log(2))).numpy()
    np.testing.assert_allclose(_scored_bpd(in_tmp / "runs/r", str(tiny_data)), port, atol=1e-4)
