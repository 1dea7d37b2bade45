"""benchmarks/reference_ports.py and throughput.py's --reference-port, with fake ports the
tests write themselves (no third-party code): the adapters' plumbing is checked against
closed forms, and one tiny end-to-end run checks the rows and ratios."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROSINALITY_URL = "git clone https://github.com/rosinality/glow-pytorch"

# rosinality/glow-pytorch's API shape: AffineCoupling(in_channel, filter_size=512, affine=True)
# never given filter_size by its callers; Glow(in_channel, n_flow, n_block) -> (log_p, logdet, z).
# Zero output convs (as the port's ZeroConv2d) make z = x * exp(logs) at init: a closed form.
FAKE_ROSINALITY = '''
import math
import torch
from torch import nn


class AffineCoupling(nn.Module):
    def __init__(self, in_channel, filter_size=512, affine=True):
        super().__init__()
        self.net = nn.Conv2d(in_channel, filter_size, 1)
        self.out = nn.Conv2d(filter_size, in_channel, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return x + self.out(torch.relu(self.net(x)))


class Glow(nn.Module):
    def __init__(self, in_channel, n_flow, n_block, affine=True, conv_lu=True):
        super().__init__()
        self.couplings = nn.ModuleList(AffineCoupling(in_channel) for _ in range(n_flow * n_block))
        self.logs = nn.Parameter(torch.zeros(in_channel))
        self.register_buffer("initialized", torch.tensor(0))

    def forward(self, x):
        self.initialized.fill_(1)
        z = x
        for c in self.couplings:
            z = c(z)
        z = z * self.logs.exp()[None, :, None, None]
        logdet = self.logs.sum() * x.shape[2] * x.shape[3] * torch.ones(x.shape[0])
        log_p = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return log_p, logdet, [z]
'''

# y0ast/Glow-PyTorch's API shape: Glow(image_shape=(H, W, C), ...) -> (z, bpd, None); it
# dequantizes x IN PLACE and its ActNorm initializes on the first forward in train mode.
FAKE_Y0AST = '''
import math
import torch
from torch import nn
from utils import shift


class Glow(nn.Module):
    def __init__(self, image_shape, hidden_channels, K, L, actnorm_scale, flow_permutation,
                 flow_coupling, LU_decomposed, y_classes, learn_top, y_condition):
        super().__init__()
        self.image_shape, self.hidden = image_shape, hidden_channels
        self.loc = nn.Parameter(torch.zeros(1))
        self.inited = False

    def forward(self, x):
        if self.training:
            self.inited = True
        x += shift()
        d = x[0].numel()
        log_p = (-0.5 * (x - self.loc) ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return x, -log_p / (math.log(2.0) * d), None

    # the pieces forward chains after its noise: flow (z, objective) and prior (mean, logs)
    def flow(self, x, logdet):
        return x - self.loc, logdet

    def prior(self, x):
        return torch.zeros_like(x), torch.zeros_like(x)


def gaussian_likelihood(mean, logs, x):
    return (-0.5 * (x - mean) ** 2 * torch.exp(-2 * logs) - logs - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
'''


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The benchmark modules, imported the way `python benchmarks/throughput.py` sees them."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("reference_ports"), importlib.import_module("throughput")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(autouse=True)
def forget_fake_ports(tmp_path):
    """The loader leaves a port's dir on sys.path and its modules loaded (a port may import
    lazily); after each test drop those of the fakes, so no other test imports them."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name, mod in list(sys.modules.items()):
        origin = getattr(mod, "__file__", None)
        if origin and Path(origin).resolve().is_relative_to(tmp_path.resolve()):
            del sys.modules[name]


def write_port(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_rosinality_adapter_sets_hidden_and_matches_closed_form(bench, tmp_path):
    ports, _ = bench
    clone = write_port(tmp_path / "glow-pytorch", {"model.py": FAKE_ROSINALITY})
    shape = (2, 4, 4)
    port = ports.PORTS["rosinality"](clone, shape, levels=2, steps=3, hidden=8, seed=0)
    # filter_size came from `hidden` although Glow never passes it; one coupling per (step, level)
    assert len(port.model.couplings) == 6
    assert all(c.net.out_channels == 8 for c in port.model.couplings)
    assert int(port.model.initialized) == 1, "the adapter runs the data-dependent init forward"

    x = torch.rand(5, *shape)
    xp = port.prepare(x)
    d = math.prod(shape)
    # Independent closed form at init: z = x - 0.5 (the port's input range), logs = 0.
    expect = (-0.5 * (x.double() - 0.5) ** 2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(port.score(xp).double(), expect, rtol=1e-5, atol=1e-4)

    loss = port.train_step(xp)
    torch.testing.assert_close(loss.double(), -expect.mean() / d, rtol=1e-5, atol=1e-6)
    # Adam's first step moves every parameter with a gradient by lr * g / (|g| + eps) ~ lr = 1e-5.
    torch.testing.assert_close(port.model.logs.detach().abs(), torch.full((2,), 1e-5), rtol=1e-3, atol=0)
    assert port.opt.defaults["fused"] in (None, False), "the port's own default Adam, not fused"

    # zero_grad between steps: the second gradient is the fresh one, not the sum of two.
    port.train_step(xp)
    logs = port.model.logs.detach().double()
    hw = shape[1] * shape[2]
    xc = (x.double() - 0.5) ** 2
    grad = (xc.sum(dim=(2, 3)).mean(0) * torch.exp(2 * logs) - hw) / d  # d loss / d logs, pre-step
    torch.testing.assert_close(port.model.logs.grad.double(), grad, rtol=1e-3, atol=1e-7)


def test_y0ast_adapter_clones_input_and_inits_in_train_mode(bench, tmp_path):
    ports, _ = bench
    # A sibling imported by bare name, as y0ast's `from modules import ...`; a stale module of
    # the same name already loaded must not be the one it gets.
    stale = sys.modules.setdefault("utils", type(sys)("utils"))
    try:
        clone = write_port(tmp_path / "Glow-PyTorch", {"model.py": FAKE_Y0AST,
                                                        "utils.py": "def shift():\n    return 1.0\n"})
        shape = (1, 3, 5)
        port = ports.PORTS["y0ast"](clone, shape, levels=1, steps=2, hidden=16, seed=0)
    finally:
        if sys.modules.get("utils") is stale:
            del sys.modules["utils"]
    assert port.model.image_shape == (3, 5, 1) and port.model.hidden == 16
    assert port.model.inited, "y0ast's ActNorm only initializes in train mode"
    port.model.eval()
    x = torch.rand(4, *shape)
    xp = port.prepare(x)
    before = xp.clone()
    got = port.score(xp).double()
    assert torch.equal(xp, before), "the port's in-place dequantization must hit a copy"
    d = math.prod(shape)
    # log p from bpd, with the port seeing x - 0.5 + 1 (its in-place shift)
    expect = (-0.5 * (x.double() + 0.5) ** 2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-4)
    loss = port.train_step(xp)
    torch.testing.assert_close(loss.double(), -expect.mean() / (d * math.log(2)), rtol=1e-5, atol=1e-6)
    assert torch.equal(xp, before)
    # log_px (what convergence.py trains on): the same x, without the port's own shift
    exact = (-0.5 * (x.double() - 0.5) ** 2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(port.log_px(xp).double(), exact, rtol=1e-5, atol=1e-4)


def test_missing_clone_and_failed_import_are_one_line_errors(bench, tmp_path):
    ports, _ = bench
    with pytest.raises(ports.PortError, match="no model.py") as err:
        ports.PORTS["rosinality"](tmp_path, (1, 4, 4), levels=1, steps=1, hidden=4, seed=0)
    assert ROSINALITY_URL in str(err.value) and "\n" not in str(err.value)

    broken = write_port(tmp_path / "broken", {"model.py": "import scipy_not_installed_here_xyz\n"})
    with pytest.raises(ports.PortError) as err:
        ports.PORTS["rosinality"](broken, (1, 4, 4), levels=1, steps=1, hidden=4, seed=0)
    msg = str(err.value)
    assert "ModuleNotFoundError" in msg and "scipy_not_installed_here_xyz" in msg
    assert ROSINALITY_URL in msg and "\n" not in msg


def test_parse_reference_port(bench, tmp_path):
    ports, tp = bench
    clone = write_port(tmp_path / "glow-pytorch", {"model.py": FAKE_ROSINALITY})
    assert tp.parse_reference_port(f"rosinality={clone}") == ("rosinality", clone.resolve())
    for spec, match in [("rosinality", "NAME=DIR"), (f"={clone}", "NAME=DIR"), ("rosinality=", "NAME=DIR"),
                        (f"nope={clone}", "unknown port 'nope'.*rosinality, y0ast"),
                        (f"rosinality={tmp_path}", "no model.py")]:
        with pytest.raises(ports.PortError, match=match):
            tp.parse_reference_port(spec)


def test_ratios_and_summary(bench):
    _, tp = bench
    rows = [{"path": "naive", "score_images_per_s": 100.0, "train_images_per_s": 50.0},
            {"path": "exact", "score_images_per_s": 300.0, "train_images_per_s": 60.0},
            {"path": "port:rosinality", "score_images_per_s": 120.0, "train_images_per_s": 80.0},
            {"path": "port:y0ast", "error": ["error: cannot import"]}]
    tp.add_ratios(rows, {"score": 600.0, "train": 120.0}, {"score": 1e9, "train": 3e9}, None)
    exact, port = rows[1], rows[2]
    assert exact["score_vs_port_rosinality"] == pytest.approx(2.5)
    assert exact["train_vs_port_rosinality"] == pytest.approx(0.75)
    assert exact["score_vs_stated_reference"] == pytest.approx(0.5)
    assert exact["train_vs_naive"] == pytest.approx(1.2)
    assert exact["train_tflops"] == pytest.approx(60 * 3e9 / 1e12)
    assert not any(k.startswith(("score_vs_port", "train_vs_port")) for k in port), "no port-vs-port ratios"
    # same convolutions, so our FLOP count gives the port's achieved rate too
    assert port["score_tflops"] == pytest.approx(120 * 1e9 / 1e12)
    assert port["score_vs_stated_reference"] == pytest.approx(0.2)
    assert not any("vs_port_y0ast" in k for k in exact), "a failed port gives no ratio"
    text = tp.summary("small-ref", rows, {"score": 600.0, "train": 120.0})
    assert "exact: 2.50x / 0.75x port:rosinality; 0.50x / 0.50x stated reference (600/120)" in text
    assert "port:y0ast: FAILED: error: cannot import" in text


def run_throughput(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "throughput.py"), *argv], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_rejects_bad_reference_port(tmp_path):
    proc = run_throughput("--config", "tiny-test", "--reference-port", f"rosinality={tmp_path}")
    assert proc.returncode == 2
    assert "no model.py" in proc.stderr and ROSINALITY_URL in proc.stderr


def test_tiny_run_end_to_end_measures_the_port(tmp_path):
    clone = write_port(tmp_path / "glow-pytorch", {"model.py": FAKE_ROSINALITY})
    out = tmp_path / "bench.json"
    proc = run_throughput("--config", "tiny-test", "--paths", "exact", "--repeats", "1", "--warmup", "1",
                          "--train-batch", "4", "--score-batch", "8,16", "--threads", "1",
                          "--reference-port", f"rosinality={clone}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["reference_ports"] == {"rosinality": str(clone.resolve())}
    # a batch sweep: one result per (train, score) pair, the single train size paired with each
    assert report["batches"] == [{"train": 4, "score": 8}, {"train": 4, "score": 16}]
    assert [(r["train_batch"], r["score_batch"]) for r in report["results"]] == [(4, 8), (4, 16)]
    assert report["sgemm_tflops"] > 0  # the measured CPU peak the fractions refer to
    result = report["results"][0]
    assert result["stated_reference"] is None and "hidden" not in result
    rows = {r["path"]: r for r in result["paths"]}
    assert rows["exact"]["score_fraction_of_peak"] == pytest.approx(
        rows["exact"]["score_tflops"] / report["sgemm_tflops"])
    assert set(rows) == {"exact", "port:rosinality"}
    exact, port = rows["exact"], rows["port:rosinality"]
    assert "error" not in port, port
    assert exact["threads"] == port["threads"] == 1
    for kind in ("score", "train"):
        assert port[f"{kind}_images_per_s"] > 0 and port["peak_rss_mb"] > 0
        assert exact[f"{kind}_vs_port_rosinality"] == pytest.approx(
            exact[f"{kind}_images_per_s"] / port[f"{kind}_images_per_s"])
    assert "exact:" in proc.stderr and "port:rosinality" in proc.stderr


@pytest.mark.parametrize("train,score", [("1,2,3", "8,16"), ("4", "0"), ("four", "8")])
def test_cli_rejects_bad_batch_lists(train, score):
    proc = run_throughput("--config", "tiny-test", "--train-batch", train, "--score-batch", score)
    assert proc.returncode == 2 and "--train-batch" in proc.stderr


# ------------------------------------------------------------------ convergence.py
@pytest.fixture(scope="module")
def convergence():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("convergence")
    finally:
        sys.path.remove(str(BENCH))


def test_time_to_reach_interpolates_between_evaluations(convergence):
    curve = [{"seconds": 10.0, "test_bpd": 6.0}, {"seconds": 20.0, "test_bpd": 5.0},
             {"seconds": 30.0, "test_bpd": 4.0}]
    assert convergence.time_to_reach(curve, 4.5) == pytest.approx(25.0)
    assert convergence.time_to_reach(curve, 6.5) == pytest.approx(10.0)
    assert convergence.time_to_reach(curve, 3.0) is None


def test_summary_compares_with_each_ports_final_mean(convergence):
    def run(impl, seed, bpds, seconds):
        return {"impl": impl, "seed": seed, "train_seconds": seconds[-1],
                "curve": [{"step": i + 1, "seconds": t, "test_bpd": b}
                          for i, (t, b) in enumerate(zip(seconds, bpds, strict=True))]}

    summary = convergence.summarise({
        "ours": [run("ours", 0, [6.0, 5.0], [10, 20]), run("ours", 1, [6.2, 5.2], [12, 22])],
        "port": [run("port", 0, [6.5, 5.6], [40, 80]), run("port", 1, [6.3, 5.4], [40, 80])]})
    assert summary["ours"]["final_bpd_mean"] == pytest.approx(5.1)
    port = summary["port"]
    assert port["final_bpd_mean"] == pytest.approx(5.5)
    # ours' mean curve: (11 s, 6.1), (21 s, 5.1); 5.5 is 60% of the way: 17 s of the port's 80 s
    assert port["ours_seconds_to_port_final"] == pytest.approx(17.0)
    assert port["time_to_quality_ratio"] == pytest.approx(17.0 / 80.0)


def test_convergence_runs_ours_end_to_end(tiny_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: glow\npreset: tiny\ndata: {tiny_data}\n"
                      "train: {epochs: 1, batch_size: 16, limit: 64, test_limit: 32, warmup_steps: 2}\n")
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, str(BENCH / "convergence.py"), "--config", str(config),
                           "--seeds", "0,1", "--eval-every", "2", "--threads", "1", "--out", str(out),
                           "--png", str(tmp_path / "c.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    ours = result["summary"]["ours"]
    assert [p["step"] for p in ours["curve"]] == [2, 4]
    assert len(ours["final_bpd"]) == 2 and all(0 < b < 20 for b in ours["final_bpd"])
    assert (tmp_path / "c.png").stat().st_size > 0 and "| ours |" in proc.stdout


# ------------------------------------------------------------- PixelCNN++ (pclucas14)
# pclucas14/pixel-cnn-pp's API shape: model.py does `from layers import *` and `from utils
# import *`; utils.py is Python 2 (`print e`) and its loss builds a helper tensor with a
# hard-coded `.cuda()`; PixelCNN(nr_resnet, nr_filters, nr_logistic_mix, resnet_nonlinearity,
# input_channels) caches `init_padding` at the first batch size and hard-codes Dropout2d(0.5);
# the loss returns the batch SUM of -log P in nats. A zero output layer gives mixture means 0,
# and the stand-in loss sum((v - mean)^2) is then a closed form in v = 2k/255 - 1.
FAKE_PCLUCAS14 = {
    "utils.py": '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Variable


def concat_elu(x):
    return F.elu(torch.cat([x, -x], dim=1))


def discretized_mix_logistic_loss_1d(x, l):
    x = x.permute(0, 2, 3, 1)
    l = l.permute(0, 2, 3, 1)
    xs = [int(y) for y in x.size()]
    nr_mix = int(l.size(-1) / 3)
    x = x.unsqueeze(-1) + Variable(torch.zeros(xs + [nr_mix]).cuda(), requires_grad=False)
    means = l[:, :, :, nr_mix:2 * nr_mix].unsqueeze(3)
    return torch.sum((x - means) ** 2) / nr_mix


def discretized_mix_logistic_loss(x, l):
    raise NotImplementedError("RGB")


def load_part_of_model(model, path):
    try:
        model.load_state_dict(torch.load(path))
    except Exception as e:
        print e
''',
    "layers.py": '''
from utils import *


class gated_resnet(nn.Module):
    def __init__(self, num_filters):
        super(gated_resnet, self).__init__()
        self.conv = nn.Conv2d(2 * num_filters, num_filters, 1)
        self.dropout = nn.Dropout2d(0.5)

    def forward(self, x):
        return x + self.dropout(self.conv(concat_elu(x)))
''',
    "model.py": '''
import torch
import torch.nn as nn
from layers import *
from utils import *


class PixelCNN(nn.Module):
    def __init__(self, nr_resnet=5, nr_filters=80, nr_logistic_mix=10,
                 resnet_nonlinearity='concat_elu', input_channels=3):
        super(PixelCNN, self).__init__()
        self.nr_filters, self.input_channels = nr_filters, input_channels
        self.nr_logistic_mix = nr_logistic_mix
        self.inp = nn.Conv2d(input_channels + 1, nr_filters, 1)
        self.blocks = nn.ModuleList([gated_resnet(nr_filters) for _ in range(nr_resnet)])
        num_mix = 3 if self.input_channels == 1 else 10
        self.nin_out = nn.Conv2d(nr_filters, num_mix * nr_logistic_mix, 1)
        nn.init.zeros_(self.nin_out.weight)
        nn.init.zeros_(self.nin_out.bias)
        self.init_padding = None

    def forward(self, x, sample=False):
        if self.init_padding is None and not sample:
            xs = [int(y) for y in x.size()]
            self.init_padding = torch.ones(xs[0], 1, xs[2], xs[3])
        h = self.inp(torch.cat((x, self.init_padding), 1))
        for block in self.blocks:
            h = block(h)
        return self.nin_out(h)
''',
}


def test_py3_source_turns_print_statements_into_calls(bench):
    ports, _ = bench
    text = "def f(e):\n    print e\n    print('kept')\nprinter = 1\nprint  a, b\n"
    assert ports.py3_source(text) == "def f(e):\n    print(e)\n    print('kept')\nprinter = 1\nprint(a, b)\n"


def test_pclucas14_adapter_matches_its_loss_in_our_convention(bench, tmp_path):
    ports, _ = bench
    clone = write_port(tmp_path / "pixel-cnn-pp", FAKE_PCLUCAS14)
    cuda = torch.Tensor.cuda
    shape = (1, 8, 4)
    port = ports.PIXELCNN_PORTS["pclucas14"](clone, shape, filters=6, n_resnet=3, n_mix=2, dropout=0.0, seed=0)
    model = port.model
    # sizes passed through; its hard-coded Dropout2d(0.5) set to ours (0 here)
    assert model.nr_filters == 6 and len(model.blocks) == 3 and model.nin_out.out_channels == 3 * 2
    assert [b.dropout.p for b in model.blocks] == [0.0] * 3
    assert torch.Tensor.cuda is cuda

    k = torch.randint(0, 256, (5, *shape))
    k[0, 0, 0, 0], k[1, 0, 0, 0] = 0, 255
    x = (k + torch.rand(k.shape)) / 256  # dequantized as our data
    v = port.prepare(x)
    torch.testing.assert_close(v, k * (2 / 255) - 1)  # its ToTensor (k/255) then (x - .5) * 2
    d = math.prod(shape)
    nll = (v.double() ** 2).flatten(1).sum(1)  # the stand-in loss per image at init
    torch.testing.assert_close(port.log_px(v).double(), -nll + d * math.log(256), rtol=1e-6, atol=1e-4)
    assert torch.Tensor.cuda is cuda, "the .cuda() shim is undone after each call"
    # init_padding was cached at batch 5: another batch size still works (the adapter resets it)
    torch.testing.assert_close(port.log_px(v[:2]).double(), -nll[:2] + d * math.log(256), rtol=1e-6, atol=1e-4)
    loss = port.train_loss_bpd(v)
    torch.testing.assert_close(loss.double(), nll.sum() / (5 * d * math.log(2)), rtol=1e-6, atol=1e-7)
    loss.backward()  # its batch-sum loss on the bits/dim scale, differentiable
    assert model.nin_out.bias.grad is not None and model.nin_out.bias.grad.abs().sum() > 0
    assert torch.Tensor.cuda is cuda

    with_dropout = ports.PIXELCNN_PORTS["pclucas14"](clone, shape, filters=6, n_resnet=1, n_mix=2,
                                                     dropout=0.25, seed=0)
    assert with_dropout.model.blocks[0].dropout.p == 0.25


@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 6, 8)])
def test_pclucas14_adapter_refuses_shapes_it_cannot_model(bench, tmp_path, shape):
    ports, _ = bench
    clone = write_port(tmp_path / "pixel-cnn-pp", FAKE_PCLUCAS14)
    with pytest.raises(ports.PortError, match="1 or 3 channels at 3 resolutions"):
        ports.PIXELCNN_PORTS["pclucas14"](clone, shape, filters=4, n_resnet=1, n_mix=1, dropout=0.0, seed=0)


def _as_pclucas14(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Our PixelCNN's weights in pclucas14's names, weight-normalised as torch's weight_norm
    stores them (the direction v, norms over all but dim 0: ConvTranspose2d's dim 0 is its
    input channels) with v a rescaled copy of the weight w and g = |w|, so g v / |v| = w."""
    g = torch.Generator().manual_seed(seed)
    names = {"u_init": "u_init", "ul_init_down": "ul_init.0", "ul_init_right": "ul_init.1", "out": "nin_out.lin_a"}
    out = {}
    for key, value in state.items():
        base, leaf = key.rsplit(".", 1)
        parts = base.split(".")
        if parts[0] in ("up_u", "up_ul", "down_u", "down_ul"):
            pass_, stream = parts[0].split("_")
            layer = {"conv_in": "conv_input", "conv_out": "conv_out", "skip": "nin_skip"}[parts[3]]
            theirs = f"{pass_}_layers.{parts[1]}.{stream}_stream.{parts[2]}.{layer}"
            theirs += ".lin_a" if layer == "nin_skip" else ".conv"
        elif parts[0] in ("down_size_u", "down_size_ul", "up_size_u", "up_size_ul"):
            which, _, stream = parts[0].split("_")
            theirs = f"{'downsize' if which == 'down' else 'upsize'}_{stream}_stream.{parts[1]}.{parts[2]}"
        else:
            theirs = names[parts[0]] + ("" if parts[0] == "out" else ".conv")
        if leaf == "bias":
            out[f"{theirs}.bias"] = value
            continue
        w = value[:, :, 0, 0] if theirs.endswith("lin_a") else value
        scale = torch.rand(w.shape[0], *[1] * (w.dim() - 1), generator=g) + 0.5
        v = w * scale
        out[f"{theirs}.weight_v"] = v
        out[f"{theirs}.weight_g"] = w.flatten(1).norm(dim=1).reshape(scale.shape)
    return out


def test_pclucas14_state_dict_converts_to_our_pixelcnn(bench):
    ports, _ = bench
    from ood_audit.models.pixelcnn import PixelCNN, PixelCNNConfig

    ours = PixelCNN(PixelCNNConfig(filters=4, n_resnet=2, n_mix=2, resolutions=3), (1, 8, 8))
    state = ours.state_dict()
    theirs = _as_pclucas14(state)
    assert len(theirs) == len(state) + sum(k.endswith(".weight") for k in state)
    converted = ports.pixelcnn_state_from_pclucas14(theirs)
    assert converted.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(converted[key], state[key], rtol=1e-5, atol=1e-6, msg=key)


def test_pclucas14_clone_parity(bench):
    """The real clone (``OOD_AUDIT_PCLUCAS14_PORT``), random weight-normalised weights:
    its loss and our PixelCNN holding its converted weights give the same log p(x)."""
    ports, _ = bench
    clone = os.environ.get("OOD_AUDIT_PCLUCAS14_PORT")
    if not clone:
        pytest.skip("OOD_AUDIT_PCLUCAS14_PORT names no clone of pclucas14/pixel-cnn-pp")
    from ood_audit.models.pixelcnn import PixelCNN, PixelCNNConfig

    shape = (1, 8, 12)
    port = ports.PIXELCNN_PORTS["pclucas14"](Path(clone), shape, filters=8, n_resnet=2, n_mix=3,
                                             dropout=0.0, seed=0)
    with torch.no_grad():
        for p in port.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = PixelCNN(PixelCNNConfig(filters=8, n_resnet=2, n_mix=3, resolutions=3), shape)
    ours.load_state_dict(ports.pixelcnn_state_from_pclucas14(port.model.state_dict()))
    port.model.eval()
    ours.eval()
    k = torch.randint(0, 256, (6, *shape))
    k[:, :, :2] = 0  # long runs of black, as in MNIST
    x = (k + torch.rand(k.shape)) / 256
    with torch.no_grad():
        ref, got = port.log_px(port.prepare(x)).double(), ours.log_prob(x).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


def _pixelcnn_config(path: Path, data: Path, **model_config) -> Path:
    path.write_text(f"model: pixelcnn\npreset: tiny\ndata: {data}\nmodel_config: {json.dumps(model_config)}\n"
                    "train: {epochs: 1, batch_size: 16, limit: 64, test_limit: 32, warmup_steps: 2}\n")
    return path


def test_family_comes_from_the_config_or_the_flag(convergence, tiny_data, tmp_path):
    ports_error = sys.modules["reference_ports"].PortError
    assert convergence.resolve_family(None, None) == (str(convergence.DEFAULT_CONFIG["glow"]), "glow")
    config, family = convergence.resolve_family(None, "pixelcnn")
    assert family == "pixelcnn" and Path(config).name == "pixelcnn_tiny.yaml"
    # the shipped default config is the README's PixelCNN++ budget
    from ood_audit.training.run import load_run_config
    shipped = load_run_config(Path(config))
    assert (shipped.model, shipped.preset, shipped.data) == ("pixelcnn", "tiny", "fashionmnist")
    assert (shipped.train.epochs, shipped.train.limit, shipped.train.batch_size) == (1, 8000, 32)

    pcnn = _pixelcnn_config(tmp_path / "p.yaml", tiny_data)
    assert convergence.resolve_family(str(pcnn), None) == (str(pcnn), "pixelcnn")
    assert convergence.resolve_family(str(pcnn), "pixelcnn") == (str(pcnn), "pixelcnn")
    with pytest.raises(ports_error, match="--family glow, but .* trains 'pixelcnn'"):
        convergence.resolve_family(str(pcnn), "glow")
    vae = tmp_path / "v.yaml"
    vae.write_text(f"model: vae\npreset: tiny\ndata: {tiny_data}\n")
    with pytest.raises(ports_error, match="trains 'vae': no reference ports"):
        convergence.resolve_family(str(vae), None)


def test_ports_must_belong_to_the_family(convergence, tmp_path):
    ports_error = sys.modules["reference_ports"].PortError
    clone = write_port(tmp_path / "pixel-cnn-pp", FAKE_PCLUCAS14)
    assert convergence.parse_ports([f"pclucas14={clone}"], "pixelcnn") == {"pclucas14": clone.resolve()}
    with pytest.raises(ports_error, match="pclucas14: a pixelcnn port; the config trains glow, whose ports "
                                          "are rosinality, y0ast"):
        convergence.parse_ports([f"pclucas14={clone}"], "glow")
    with pytest.raises(ports_error, match="y0ast: a glow port; .* pixelcnn, whose ports are pclucas14"):
        convergence.parse_ports([f"y0ast={clone}"], "pixelcnn")
    with pytest.raises(ports_error, match="nope: unknown"):
        convergence.parse_ports([f"nope={clone}"], "pixelcnn")
    with pytest.raises(ports_error, match="no model.py"):
        convergence.parse_ports([f"pclucas14={tmp_path}"], "pixelcnn")


def test_pixelcnn_port_sizes_follow_our_resolved_config(convergence, tiny_data, tmp_path):
    from ood_audit.training.run import load_run_config

    config = load_run_config(_pixelcnn_config(tmp_path / "p.yaml", tiny_data, n_mix=3, dropout=0.1))
    assert convergence._model_sizes(config, (1, 8, 8)) == {"filters": 16, "n_resnet": 1, "n_mix": 3,
                                                            "dropout": 0.1}
    # 6x6 fits 2 resolutions only; the port's 3 are fixed
    with pytest.raises(sys.modules["reference_ports"].PortError, match="3 resolutions"):
        convergence._model_sizes(config, (1, 6, 6))


def test_convergence_trains_ours_and_a_pixelcnn_port_alike(tiny_data, tmp_path):
    clone = write_port(tmp_path / "pixel-cnn-pp", FAKE_PCLUCAS14)
    config = _pixelcnn_config(tmp_path / "p.yaml", tiny_data)
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, str(BENCH / "convergence.py"), "--config", str(config),
                           "--port", f"pclucas14={clone}", "--seeds", "0,1", "--eval-every", "3",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["family"] == "pixelcnn" and out.with_suffix(".png").stat().st_size > 0
    summary = result["summary"]
    # 64 images in batches of 16: 4 steps, evaluated at 3 and at the last step
    for impl in ("ours", "pclucas14"):
        assert [p["step"] for p in summary[impl]["curve"]] == [3, 4]
        assert all(0 < b < 20 for b in summary[impl]["final_bpd"])
    port_run = result["runs"]["pclucas14"][0]
    assert len(port_run["clipped_frac"]) == 1 and 0 <= port_run["clipped_frac"][0] <= 1
    # the stand-in's weights are no PixelCNN++: the parity check says so instead of failing the run
    assert "parity_error" in port_run and "| pclucas14 |" in proc.stdout and "failed:" in proc.stdout
    assert summary["pclucas14"]["ours_minus_port_bpd"] == pytest.approx(
        summary["ours"]["final_bpd_mean"] - summary["pclucas14"]["final_bpd_mean"])
