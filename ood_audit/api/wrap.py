"""A plain ``torch.nn.Module`` (or a normflows / nflows / zuko flow) as a density model,
for the Python API: the rules of ``ood-audit import python``, which live in one place,
:mod:`ood_audit.models.imported` (input range, discrete offset, where the terms come
from, ``[B]`` checks); this module names them for ``ood_audit.audit`` and adds the
fingerprint of a model scored from memory.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..models.imported import DISCRETE_TERM, INPUT_TERM, PLAIN_TERM, ImportedModel, wrap_module
from ..models.input_ranges import INPUT_RANGES

#: The wrapper of a module scored from memory is the ``imported`` family's.
WrappedModule = ImportedModel

__all__ = ["DISCRETE_TERM", "INPUT_RANGES", "INPUT_TERM", "PLAIN_TERM", "WrappedModule",
           "weights_sha256", "wrap_module"]


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): the
    ``checkpoint_sha256`` of a model scored from memory."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
