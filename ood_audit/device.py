"""The device choice: the one place a device name becomes a ``torch.device``."""

from __future__ import annotations

import torch

from .errors import UserError


def pick_device(name: str) -> torch.device:
    """``auto`` (a GPU when torch sees one), ``cpu``, ``cuda`` or ``cuda:N``; anything else
    (``meta``, ``mps``, ``cuda:x``...) is a UserError before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU; "
                            "use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA "
                            f"GPU(s), numbered from 0")
    return torch.device(name)
