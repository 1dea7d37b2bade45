"""Adapters that run a user's clone of a popular PyTorch Glow port in ``throughput.py``.

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
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

#: Where to get each port; named in every error so the fix is one command away.
CLONE_URLS = {"rosinality": "https://github.com/rosinality/glow-pytorch",
              "y0ast": "https://github.com/y0ast/Glow-PyTorch"}


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
        spec.loader.exec_module(module)
    except Exception as exc:  # ImportError (scipy missing), SyntaxError, ...: one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise PortError(f"cannot import {model_py}: {type(exc).__name__}: {detail} "
                        f"(needs a clone of the {name} port: {clone_hint(name)} DIR, and its "
                        "requirements)") from None
    sys.modules[spec.name] = module
    return module


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
                 exact_log_px_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self._loss = loss_fn
        self._log_px = log_px_fn
        self._exact_log_px = exact_log_px_fn or log_px_fn
        self.prepare = prepare
        # The port's own default Adam (per-tensor, not fused), as its training script builds it.
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-5)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._log_px(x)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """The port's log p(x) of prepared ``x`` exactly as given (no noise of its own), with
        autograd: ``convergence.py`` trains and evaluates every implementation on it."""
        return self._exact_log_px(x)

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
