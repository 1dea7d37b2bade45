"""Configuration dataclasses and their loading from YAML / dicts.

YAML and CLI flags are parsed at the edge into these dataclasses; unknown keys and
wrong types are a :class:`~ood_audit.errors.UserError` naming the key, never ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import UserError
from .models.fastpath_names import FAST_PATHS
from .parsing import from_dict, load_yaml, require_positive, to_dict

__all__ = ["MAX_SEED", "RunConfig", "TrainConfig", "from_dict", "keep_every", "load_yaml",
           "require_positive", "to_dict"]

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
