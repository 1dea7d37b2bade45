"""Configuration dataclasses and their loading from YAML / dicts.

YAML and CLI flags are parsed at the edge into these dataclasses; unknown keys and
wrong types are a :class:`~ood_audit.errors.UserError` naming the key, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    ``where`` names the source (a file, ``model_config``...) in error messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of keys for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}: {key}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError, UserError) as exc:
        raise UserError(f"{where}: {exc}") from None
    return obj


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint (int/float/str/bool/Optional/dict/dataclass)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-3 as a string (YAML 1.1); accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping, turning I/O and syntax errors into one-line user errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a YAML text file (not UTF-8)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def to_dict(obj: Any) -> dict:
    """A dataclass as a plain dict (for YAML/JSON)."""
    return dataclasses.asdict(obj)


def require_positive(**values: int | float | None) -> None:
    """Raise a UserError naming the first value that is zero, negative, NaN or infinite."""
    for name, value in values.items():
        if value is not None and not (0 < value < math.inf):
            raise UserError(f"{name} must be a positive finite number, got {value}"
                            if isinstance(value, float) else f"{name} must be positive, got {value}")


#: Seeds torch.manual_seed accepts without wrapping: 0 .. 2**63 - 1.
MAX_SEED = 2**63 - 1


@dataclass
class TrainConfig:
    """How ``ood-audit train`` optimises a model."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200  # linear learning-rate warm-up (Glow)
    # The loss training minimises and clips: bits_per_dim (-log p(x) / (D ln 2), Glow's
    # scale, so a clip norm means the same for every image size) or nats_per_image (the
    # same loss D ln 2 times larger: 543x for 28x28; runs before 0.2 used it).
    loss_scale: str = "bits_per_dim"
    max_grad_norm: float = 50.0  # clip the global gradient norm, on the loss_scale above
    weight_decay: float = 0.0
    # Polyak averaging (openai/glow): evaluate and checkpoint an exponential moving average
    # of the weights with this decay per step; 0 = off (the last iterate).
    ema_decay: float = 0.0
    seed: int = 0
    limit: int | None = None  # train on the first N images only
    test_limit: int | None = 2000  # test images scored after each epoch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    keep_checkpoints: str = "all"  # all | last | every:N  (per-epoch copies, for over-training)
    max_bad_steps: int = 20  # consecutive non-finite steps before training stops
    # Background model of the likelihood-ratio detector (Ren et al. 2019): each training
    # pixel is replaced, with this probability, by a uniform random value in 0..255.
    perturb_mu: float = 0.0
    # Opt-in fast paths of models that have them (Glow: ood_audit/models/fastpath.py
    # FAST_PATHS); empty = the exact float32 path. Kept in config.yaml, so --resume keeps them.
    fast_path: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fast_path:
            from .models.fastpath import FAST_PATHS  # lazy: config loading stays torch-free

            bad = [n for n in self.fast_path if not isinstance(n, str) or n not in FAST_PATHS]
            if bad:
                raise UserError(f"unknown fast path(s) {', '.join(map(repr, bad))} in fast_path; "
                                f"choose from {', '.join(FAST_PATHS)}")
            self.fast_path = list(dict.fromkeys(self.fast_path))  # drop repeats, keep order
        require_positive(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            max_grad_norm=self.max_grad_norm, limit=self.limit, test_limit=self.test_limit,
            max_bad_steps=self.max_bad_steps,
        )
        if self.warmup_steps < 0 or not 0 <= self.weight_decay < math.inf:
            raise UserError(f"warmup_steps and weight_decay must be zero or positive (and "
                            f"finite), got {self.warmup_steps} and {self.weight_decay}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.perturb_mu < 1.0:
            raise UserError(f"perturb_mu (--mu) must be in [0, 1), got {self.perturb_mu}")
        if self.loss_scale not in LOSS_SCALES:
            raise UserError(f"loss_scale must be one of {', '.join(LOSS_SCALES)}, got "
                            f"{self.loss_scale!r}")
        keep_every(self.keep_checkpoints)  # validates


#: Training loss scales: what one nat of -log p(x) per image is multiplied by, given D.
LOSS_SCALES: dict[str, str] = {
    "bits_per_dim": "-log p(x) / (D ln 2), Glow's scale (the default)",
    "nats_per_image": "-log p(x) in nats (ood-audit before 0.2)",
}


def keep_every(policy: str) -> int | None:
    """Parse a keep_checkpoints policy: every N epochs (all = 1), or None for last only."""
    if policy == "all":
        return 1
    if policy == "last":
        return None
    if policy.startswith("every:"):
        try:
            n = int(policy.split(":", 1)[1])
        except ValueError:
            n = 0
        if n > 0:
            return n
    raise UserError(f"keep_checkpoints must be all, last or every:N (N > 0), got {policy!r}")


@dataclass
class RunConfig:
    """Everything that defines a training run; saved as the run's ``config.yaml``."""

    model: str = "glow"
    preset: str = "small"
    data: str = "fashionmnist"
    model_config: dict = field(default_factory=dict)  # overrides of the preset's values
    train: TrainConfig = field(default_factory=TrainConfig)
