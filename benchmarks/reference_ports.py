"""Adapters that run a user's clone of a popular PyTorch Glow or PixelCNN++ port in
``throughput.py`` (Glow) and ``convergence.py`` (both families).

The issue's reference figures came from "a reference PyTorch Glow port"; they do not
reproduce on our machines with either port below, so the benchmark measures the port in
the same run instead (same shapes, batches, threads, warmup and repeats) and reports the
ratio to what it measured. No port code lives in this repository: each adapter imports
``model.py`` from a directory the user cloned, and wraps it in the same two calls the
benchmark times for our Glow:

    port = PORTS["rosinality"](Path("glow-pytorch"), (1, 32, 32), levels=2, steps=8, hidden=128, seed=0)
    x = port.prepare(torch.rand(64, 1, 32, 32))   # [0, 1) -> the port's input range, untimed
    port.score(x)        # no-grad forward; returns the port's per-image log-density (its own constants)
    port.train_step(x)   # zero_grad, loss, backward, Adam(lr=1e-5) step; returns the loss

``throughput.py`` runs each port in its own child process (the ports import sibling
modules by bare names such as ``modules`` and ``utils``), with glibc's default allocator.

PixelCNN++ (``PIXELCNN_PORTS``, pclucas14/pixel-cnn-pp) has its own sizes:

    port = PIXELCNN_PORTS["pclucas14"](Path("pixel-cnn-pp"), (1, 28, 28), filters=16, n_resnet=1,
                                       n_mix=2, dropout=0.0, seed=0)
    v = port.prepare(x)          # dequantized x in [0, 1) -> k = floor(256 x) -> 2k/255 - 1
    port.log_px(v)               # [B]: -(its loss per image) + D log 256, our convention
    port.train_loss_bpd(v)       # its batch-sum loss / (B D ln 2), what convergence.py trains
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

#: Where to get each port; named in every error so the fix is one command away.
CLONE_URLS = {"rosinality": "https://github.com/rosinality/glow-pytorch",
              "y0ast": "https://github.com/y0ast/Glow-PyTorch",
              "pclucas14": "https://github.com/pclucas14/pixel-cnn-pp"}

#: Sibling modules of a port that are Python 2 (``print e``): their ``print`` statements
#: become calls at import time, in memory; the clone's files are never changed.
PY2_SIBLINGS = {"pclucas14": ("utils",)}


class PortError(Exception):
    """A port cannot be loaded or built; the message is one line and says what to clone."""


def clone_hint(name: str) -> str:
    return f"git clone {CLONE_URLS[name]}"


def check_clone(name: str, clone_dir: Path) -> Path:
    """The port's ``model.py`` in ``clone_dir``, or a PortError naming what to clone."""
    if name not in CLONE_URLS:
        raise PortError(f"unknown reference port {name!r}; known: {', '.join(CLONE_URLS)}")
    model_py = Path(clone_dir) / "model.py"
    if not model_py.is_file():
        raise PortError(f"{clone_dir} has no model.py: expected a clone of the {name} port "
                        f"({clone_hint(name)} DIR)")
    return model_py


def load_model_module(name: str, clone_dir: Path) -> ModuleType:
    """Import the port's ``model.py`` under a private name, its directory first on sys.path.

    The private name keeps it apart from any other ``model`` module; sibling modules it
    imports by bare name (``from modules import ...``) are dropped from sys.modules first
    when they came from elsewhere, so a second port in the same process gets its own.
    """
    clone_dir = Path(clone_dir).resolve()
    model_py = check_clone(name, clone_dir)
    torch_compat()
    for sibling in clone_dir.glob("*.py"):
        loaded = sys.modules.get(sibling.stem)
        origin = getattr(loaded, "__file__", None)
        if loaded is not None and (origin is None or Path(origin).resolve().parent != clone_dir):
            del sys.modules[sibling.stem]
    sys.path.insert(0, str(clone_dir))
    spec = importlib.util.spec_from_file_location(f"_reference_port_{name}_model", model_py)
    module = importlib.util.module_from_spec(spec)
    try:
        for sibling in PY2_SIBLINGS.get(name, ()):
            _load_py2_sibling(clone_dir / f"{sibling}.py")
        spec.loader.exec_module(module)
    except Exception as exc:  # ImportError (scipy missing), SyntaxError, ...: one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise PortError(f"cannot import {model_py}: {type(exc).__name__}: {detail} "
                        f"(needs a clone of the {name} port: {clone_hint(name)} DIR, and its "
                        "requirements)") from None
    sys.modules[spec.name] = module
    return module


def py3_source(text: str) -> str:
    """Python 2 ``print x`` statements as ``print(x)`` calls (nothing else is changed)."""
    return re.sub(r"^([ \t]*)print[ \t]+(?![ \t(=])(.+?)[ \t]*$", r"\1print(\2)", text, flags=re.MULTILINE)


def _load_py2_sibling(path: Path) -> None:
    """Import ``path`` under its bare name (as ``from utils import *`` finds it), its
    source passed through :func:`py3_source` first."""
    module = ModuleType(path.stem)
    module.__file__ = str(path)
    sys.modules[path.stem] = module
    try:
        exec(compile(py3_source(path.read_text()), str(path), "exec"), module.__dict__)
    except BaseException:
        del sys.modules[path.stem]
        raise


def torch_compat() -> None:
    """Shims for torch functions the ports call that today's torch has removed:
    ``torch.qr`` (y0ast's 1x1 conv init; removed in favour of ``torch.linalg.qr``)."""
    try:
        torch.qr(torch.eye(2))
    except (RuntimeError, AttributeError):
        torch.qr = lambda a, some=True: torch.linalg.qr(a, mode="reduced" if some else "complete")


class PortRunner:
    """One built port: ``prepare`` (untimed), ``score`` and ``train_step`` (timed)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 log_px_fn: Callable[[torch.Tensor], torch.Tensor], prepare: Callable[[torch.Tensor], torch.Tensor],
                 exact_log_px_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 bpd_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self._loss = loss_fn
        self._log_px = log_px_fn
        self._exact_log_px = exact_log_px_fn or log_px_fn
        self.prepare = prepare
        self._bpd_loss = bpd_loss_fn
        # The port's own default Adam (per-tensor, not fused), as its training script builds it.
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-5)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._log_px(x)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """The port's log p(x) of prepared ``x`` exactly as given (no noise of its own), with
        autograd: ``convergence.py`` trains and evaluates every implementation on it."""
        return self._exact_log_px(x)

    def train_loss_bpd(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss on the bits/dim scale (up to a constant): -mean log p / (D ln 2),
        or the port's own batch loss on that scale where it has one."""
        if self._bpd_loss is not None:
            return self._bpd_loss(x)
        return -self._exact_log_px(x).mean() / (math.prod(x.shape[1:]) * math.log(2.0))

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        loss = self._loss(x)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _rosinality(clone_dir: Path, shape: tuple[int, int, int], levels: int, steps: int, hidden: int,
                seed: int, device: str = "cpu") -> PortRunner:
    """rosinality/glow-pytorch: ``Glow(in_channel, n_flow, n_block)``, forward -> (log_p, logdet, z)."""
    m = load_model_module("rosinality", clone_dir)
    try:
        # AffineCoupling's filter_size (512) is a default argument Flow never passes: set it
        # here so `hidden` means the same as in our configs. Defaults: (filter_size, affine).
        m.AffineCoupling.__init__.__defaults__ = (hidden, True)
        torch.manual_seed(seed)
        model = m.Glow(shape[0], steps, levels, affine=True, conv_lu=True).to(device)
    except Exception as exc:
        raise PortError(f"cannot build the rosinality port from {clone_dir}: {type(exc).__name__}: {exc}; "
                        f"is it a clone of {CLONE_URLS['rosinality']}?") from None
    dims = math.prod(shape)

    def log_px(x):
        log_p, logdet, _ = model(x)
        return log_p + logdet

    def prepare(x):  # its train.py feeds images in [-0.5, 0.5)
        return (x - 0.5).to(device)

    with torch.no_grad():  # ActNorm's data-dependent init runs on the first forward
        model(prepare(torch.rand(16, *shape, generator=torch.Generator().manual_seed(seed))))
    return PortRunner(model, lambda x: -log_px(x).mean() / dims, log_px, prepare)


def _y0ast(clone_dir: Path, shape: tuple[int, int, int], levels: int, steps: int, hidden: int,
           seed: int, device: str = "cpu") -> PortRunner:
    """y0ast/Glow-PyTorch: ``Glow(image_shape=(H, W, C), ...)``, forward -> (z, bpd, y_logits)."""
    m = load_model_module("y0ast", clone_dir)
    c, h, w = shape
    try:
        torch.manual_seed(seed)
        model = m.Glow(image_shape=(h, w, c), hidden_channels=hidden, K=steps, L=levels, actnorm_scale=1.0,
                       flow_permutation="invconv", flow_coupling="affine", LU_decomposed=True,
                       y_classes=0, learn_top=True, y_condition=False).to(device)
    except Exception as exc:
        raise PortError(f"cannot build the y0ast port from {clone_dir}: {type(exc).__name__}: {exc}; "
                        f"is it a clone of {CLONE_URLS['y0ast']}?") from None
    dims = math.prod(shape)

    # forward adds the dequantization noise to x IN PLACE: each call gets its own copy,
    # as a data loader would hand it a fresh batch.
    def bpd(x):
        return model(x.clone())[1]

    def log_px(x):  # bpd = -objective / (D log 2), objective including -D log 256
        return -bpd(x) * dims * math.log(2.0)

    def exact_log_px(x):
        """The port's log p(x) of x as given (already dequantized): its forward without the
        noise it adds itself (``uniform_binning_correction``), so every implementation
        sees the same x. Density of x in [-0.5, 0.5)^D, as ours of x + 0.5 in [0, 1)^D."""
        z, objective = model.flow(x, logdet=torch.zeros(len(x), device=x.device))
        mean, logs = model.prior(x)
        return objective + m.gaussian_likelihood(mean, logs, z)

    def prepare(x):  # its train.py feeds images in [-0.5, 0.5)
        return (x - 0.5).to(device)

    model.train()  # ActNorm initializes on the first forward in train mode only
    with torch.no_grad():
        model(prepare(torch.rand(16, *shape, generator=torch.Generator().manual_seed(seed))))
    return PortRunner(model, lambda x: bpd(x).mean(), log_px, prepare, exact_log_px)


#: name -> adapter(clone_dir, shape (C, H, W), levels, steps, hidden, seed, device="cpu") -> PortRunner
PORTS: dict[str, Callable[..., PortRunner]] = {"rosinality": _rosinality, "y0ast": _y0ast}


# ------------------------------------------------------------------------ PixelCNN++
@contextlib.contextmanager
def _cuda_is_identity(device: str):
    """Its loss builds a helper tensor with a hard-coded ``.cuda()``: on a CPU run, for
    the duration of the call, ``Tensor.cuda`` returns the tensor where it is."""
    if torch.device(device).type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _pclucas14(clone_dir: Path, shape: tuple[int, int, int], filters: int, n_resnet: int, n_mix: int,
               dropout: float, seed: int, device: str = "cpu") -> PortRunner:
    """pclucas14/pixel-cnn-pp: ``PixelCNN(nr_resnet, nr_filters, nr_logistic_mix, input_channels)``,
    forward(v) -> mixture parameters; ``discretized_mix_logistic_loss[_1d](v, out)`` -> the
    batch SUM of -log P(k) in nats, v = 2k/255 - 1 (its ``ToTensor`` then ``rescaling``).

    Its three resolutions are fixed (H, W divisible by 4). Its ``Dropout2d(0.5)`` is
    hard-coded in every gated ResNet: set here to ``dropout`` (our config's), so both train
    the same network. It caches ``init_padding`` (the ones channel) at the first batch
    size: reset before every forward, so any batch size works.
    """
    m = load_model_module("pclucas14", clone_dir)  # its namespace holds utils' (import *)
    channels, height, width = shape
    if channels not in (1, 3) or height % 4 or width % 4:
        raise PortError(f"the pclucas14 port models 1 or 3 channels at 3 resolutions (H, W divisible "
                        f"by 4); got shape {tuple(shape)}")
    try:
        torch.manual_seed(seed)
        model = m.PixelCNN(nr_resnet=n_resnet, nr_filters=filters, nr_logistic_mix=n_mix,
                           input_channels=channels).to(device)
        loss_fn = m.discretized_mix_logistic_loss_1d if channels == 1 else m.discretized_mix_logistic_loss
    except Exception as exc:
        raise PortError(f"cannot build the pclucas14 port from {clone_dir}: {type(exc).__name__}: {exc}; "
                        f"is it a clone of {CLONE_URLS['pclucas14']}?") from None
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout2d):
            module.p = dropout
    dims = math.prod(shape)

    def network(v):
        model.init_padding = None  # cached at the first batch size otherwise
        return model(v)

    def batch_nll(v):  # its loss: sum over the batch of -log P(k), nats
        with _cuda_is_identity(device):
            return loss_fn(v, network(v))

    def log_px(v):  # per image: its loss on each image's slice of one forward's output
        out = network(v)
        with _cuda_is_identity(device):
            nll = torch.stack([loss_fn(v[i:i + 1], out[i:i + 1]) for i in range(len(v))])
        return -nll + dims * math.log(256)

    def prepare(x):  # dequantized x in [0, 1) -> pixel k -> its input scale 2k/255 - 1
        k = torch.floor(x * 256).clamp_(0, 255)
        return (k * (2.0 / 255.0) - 1.0).to(device)

    return PortRunner(model, lambda v: batch_nll(v) / (len(v) * dims), log_px, prepare,
                      bpd_loss_fn=lambda v: batch_nll(v) / (len(v) * dims * math.log(2.0)))


def pixelcnn_state_from_pclucas14(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pclucas14 PixelCNN state dict as ood-audit's PixelCNN (same layers, same order):
    weight-normalised weights (``weight_g``, ``weight_v``, norm over all but dim 0) become
    plain weights, its ``nin`` linear layers 1x1 convolutions. Reads tensors only."""
    def weight(prefix):
        if f"{prefix}.weight" in state:
            return state[f"{prefix}.weight"]
        v, g = state[f"{prefix}.weight_v"], state[f"{prefix}.weight_g"]
        return v * (g / v.flatten(1).norm(dim=1).reshape(g.shape))  # torch's weight_norm, dim 0

    out: dict[str, torch.Tensor] = {}

    def put(ours, theirs, linear=False):
        w = weight(theirs)
        out[f"{ours}.weight"] = w[:, :, None, None] if linear else w
        out[f"{ours}.bias"] = state[f"{theirs}.bias"]

    put("u_init.conv", "u_init.conv")
    put("ul_init_down.conv", "ul_init.0.conv")
    put("ul_init_right.conv", "ul_init.1.conv")
    blocks = {(k.split(".")[0], int(k.split(".")[1]), k.split(".")[2], int(k.split(".")[3]))
              for k in state if k.startswith(("up_layers.", "down_layers."))}
    for layers, i, stream, j in sorted(blocks):
        ours = f"{'up' if layers == 'up_layers' else 'down'}_{stream.removesuffix('_stream')}.{i}.{j}"
        theirs = f"{layers}.{i}.{stream}.{j}"
        put(f"{ours}.conv_in.conv", f"{theirs}.conv_input.conv")
        put(f"{ours}.conv_out.conv", f"{theirs}.conv_out.conv")
        if f"{theirs}.nin_skip.lin_a.bias" in state:
            put(f"{ours}.skip", f"{theirs}.nin_skip.lin_a", linear=True)
    for i in range(2):
        put(f"down_size_u.{i}.conv", f"downsize_u_stream.{i}.conv")
        put(f"down_size_ul.{i}.conv", f"downsize_ul_stream.{i}.conv")
        put(f"up_size_u.{i}.deconv", f"upsize_u_stream.{i}.deconv")
        put(f"up_size_ul.{i}.deconv", f"upsize_ul_stream.{i}.deconv")
    put("out", "nin_out.lin_a", linear=True)
    return {k: v.detach().clone() for k, v in out.items()}


#: name -> adapter(clone_dir, shape, filters, n_resnet, n_mix, dropout, seed, device="cpu")
PIXELCNN_PORTS: dict[str, Callable[..., PortRunner]] = {"pclucas14": _pclucas14}
#: the ports of each model family, as convergence.py compares them (family of --config's model)
PORTS_BY_FAMILY: dict[str, dict[str, Callable[..., PortRunner]]] = {"glow": PORTS,
                                                                  "pixelcnn": PIXELCNN_PORTS}
