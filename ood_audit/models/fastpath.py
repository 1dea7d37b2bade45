"""Opt-in fast paths for flow scoring and training, and the CPU allocator setting the
exact path relies on.

The exact path (the default) is float32 and eager; on CPU its activations are
channels-last (NHWC strides), the layout oneDNN convolves fastest (measured on 2 cores:
1.26x / 1.15x the GEMM forms we had on the small reference config, scoring / training,
and at par on the standard one, where both run at 80-98% of the machine's float32 GEMM
rate; ``benchmarks/README.md``), on GPUs NCHW unless ``channels_last`` is on. It equals
the naive path (NCHW, uncached) up to float rounding. Each fast path below may change
log p(x) by rounding (or, for bf16, by more); the ones in effect are recorded in the
scores' and the checkpoint's metadata (``model.fast_path``), and ``tests/test_fast_path.py``
states and checks each one's tolerance against the exact path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import shutil
from dataclasses import dataclass, fields

import torch

from ..errors import UserError
from .fastpath_names import FAST_PATHS
from .flows.coupling import AffineCoupling
from .flows.invconv import InvConv1x1

__all__ = ["FAST_PATHS", "FastPath", "activation_memory_format", "apply_memory_format",
           "apply_to_layers", "enable_tf32", "require_compile", "tune_cpu_allocator"]


@dataclass
class FastPath:
    """The fast paths in effect for one model. ``naive`` (off by default) is the
    benchmark's baseline: no caches of parameter-only values and NCHW activations
    everywhere (the exact path reuses W of the 1x1 convs between scoring batches and runs
    channels-last on CPU)."""

    channels_last: bool = False
    compile: bool = False
    bf16: bool = False
    tf32: bool = False
    naive: bool = False

    def describe(self) -> str:
        """``exact`` or the options on, joined by ``+`` (``channels_last+bf16``)."""
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return "+".join(on) or "exact"

    def set(self, name: str, value: object) -> None:
        if name not in FAST_PATHS and name != "naive":
            raise UserError(f"unknown fast path {name!r}; choose from {', '.join(FAST_PATHS)}")
        if not isinstance(value, bool):
            raise UserError(f"fast path {name} takes true or false, got {value!r}")
        setattr(self, name, value)


def require_compile(device_type: str) -> None:
    """Raise :class:`UserError` naming what torch.compile lacks on this machine."""
    if not hasattr(torch, "compile"):
        raise UserError("--compile needs torch >= 2.0 (torch.compile); drop --compile")
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise UserError("--compile on CUDA needs the triton package (pip install triton); "
                            "drop --compile or install it")
        return
    cxx = os.environ.get("CXX")
    found = [c for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"] if shutil.which(c)]
    if not found:
        raise UserError("--compile on CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX), "
                        "none found; install one (apt-get install g++) or drop --compile")


def enable_tf32(device_type: str) -> bool:
    """Allow TF32 in CUDA matmuls and cuDNN convolutions; False (nothing done) off CUDA."""
    if device_type != "cuda":
        return False
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None:  # torch >= 2.9 API
        matmul.fp32_precision = "tf32"
        conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return True


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap and are reused; freed heap is kept up to this.
_KEEP_BYTES = 1 << 30
_allocator_state: str | None = None


def tune_cpu_allocator() -> str:
    """Let glibc reuse freed memory for large CPU tensors instead of mmap/munmap per tensor.

    glibc serves blocks above its mmap threshold (at most 32 MiB by default) with a fresh
    mmap, which the kernel hands out as zeroed pages, one page fault per 4 KiB on first
    touch, and gives back on free. A Glow activation at batch 256 (256 x 128 x 16 x 16
    float32 = 32 MiB) crosses it, so every conv output paid ~8k page faults: the exact
    path scored 2-3x slower than with the heap reused. Raising the mmap and trim thresholds
    to 1 GiB keeps freed blocks for reuse (what jemalloc / tcmalloc do; PyTorch's CPU
    tuning guide recommends those). Numbers are unchanged; peak RSS may stay at its high
    mark. Process-wide, done once; set ``OOD_AUDIT_CPU_ALLOCATOR=default`` (or glibc's own
    ``MALLOC_MMAP_THRESHOLD_``) to keep the default. Returns what was done.
    """
    global _allocator_state
    if _allocator_state is not None:
        return _allocator_state
    if os.environ.get("OOD_AUDIT_CPU_ALLOCATOR", "") == "default":
        _allocator_state = "default (OOD_AUDIT_CPU_ALLOCATOR=default)"
    elif "MALLOC_MMAP_THRESHOLD_" in os.environ:
        _allocator_state = "default (MALLOC_MMAP_THRESHOLD_ set by the user)"
    else:
        _allocator_state = _mallopt()
    return _allocator_state


def _mallopt() -> str:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        ok = (mallopt is not None and mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_KEEP_BYTES)) == 1
              and mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_KEEP_BYTES)) == 1)
    except OSError:
        ok = False
    # musl, macOS and Windows have no mallopt: their allocators are left as they are.
    return "glibc heap reuse up to 1 GiB" if ok else "default (no glibc mallopt)"


def activation_memory_format(device_type: str, fast: FastPath) -> torch.memory_format:
    """The memory format the path convolves fastest: channels-last on CPU (outside the
    naive baseline) and with the ``channels_last`` fast path; otherwise NCHW (cuDNN)."""
    if fast.channels_last or (device_type == "cpu" and not fast.naive):
        return torch.channels_last
    return torch.contiguous_format


def apply_memory_format(x: torch.Tensor, fast: FastPath) -> torch.Tensor:
    """``x`` in :func:`activation_memory_format`; a no-op where that is NCHW."""
    fmt = activation_memory_format(x.device.type, fast)
    if x.dim() == 4 and fmt is torch.channels_last:
        return x.contiguous(memory_format=fmt)
    return x


def apply_to_layers(model: torch.nn.Module, fast: FastPath) -> None:
    """Set the precision knobs of the layers that have one: the coupling networks run in
    bfloat16 with ``bf16``; the 1x1 convolutions in float64 with ``tf32`` (which would
    lower their precision). Everything else a fast path changes is applied by the
    composite around the layers (:class:`~ood_audit.models.flows.multiscale.MultiScaleFlow`)."""
    for module in model.modules():
        if isinstance(module, AffineCoupling):
            module.bf16 = fast.bf16
        if isinstance(module, InvConv1x1):
            module.float64 = fast.tf32
