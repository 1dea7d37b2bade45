"""Weight files from elsewhere, read as data: state dicts only, never pickled code.

``.safetensors`` files are read by safetensors; ``.pt``/``.pth``/``.bin`` files by
``torch.load(..., weights_only=True)``, which refuses pickled Python objects other than
tensors and plain containers. A file that holds a whole pickled model (``torch.save(model)``)
is refused in one line asking for ``model.state_dict()`` instead: ``ood-audit import``
runs no code but the one file ``import python`` is told to run.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError

#: Keys under which training scripts nest the model's state dict in a checkpoint.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def read_state_dict(path: Path, what: str = "weights") -> dict[str, Tensor]:
    """The state dict in ``path``: a flat mapping of names to tensors, or one nested under
    a key of :data:`NESTED_KEYS` (``{"model": ..., "optimizer": ...}``). UserError for a
    missing, unreadable or other file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no {what} file at {path}: give the path of the saved state dict")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path} is not a readable safetensors file ({_short(exc)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path} holds pickled Python objects, not only tensors, and "
                        "ood-audit reads weight files as data (torch.load weights_only=True): "
                        f"save model.state_dict() instead ({_short(exc)})") from None
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a readable torch file ({_short(exc)}); it may be "
                        "truncated") from None
    return _state_dict_in(obj, path, what)


def _state_dict_in(obj: object, path: Path, what: str) -> dict[str, Tensor]:
    if _is_state_dict(obj):
        return dict(obj)  # type: ignore[arg-type]
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(map(repr, list(obj)[:6]))
        raise UserError(f"{path} is not a state dict of {what}: its top-level keys ({keys}) "
                        f"are not all tensors, and none of {', '.join(NESTED_KEYS)} holds one")
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict of {what}: save "
                    "model.state_dict()")


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
