"""Configuration dataclasses and their loading from YAML / dicts.

YAML and CLI flags are parsed at the edge into these dataclasses; unknown keys and
wrong types are a :class:`~ood_audit.errors.UserError` naming the key, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.transforms import parse_transforms
from .errors import UserError
from .models.fastpath_names import FAST_PATHS
from .models.input_ranges import DEFAULT_INPUT_RANGE, INPUT_RANGES
from .parsing import from_dict, load_yaml, require_positive, to_dict

__all__ = ["MAX_SEED", "REPORT_FORMATS", "SECOND_ORDER_CENTERS", "DecomposeConfig", "ReportConfig",
           "RunConfig", "ScoreConfig", "TrainConfig", "from_dict", "keep_every", "load_yaml", "parse_formats",
           "require_positive", "to_dict", "TrainRequest", "ImportRequest", "IMPORT_KINDS"]

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
    """Everything that defines a training run; saved as the run's ``config.yaml``.

    ``model_config`` is the model family's config dataclass (``GlowConfig``...): given as
    a mapping of overrides (YAML, ``model_config: {hidden: 32}``), it is resolved on
    construction over the preset and the family's fixed settings, and checked there once
    (:func:`~ood_audit.models.registry.model_settings`). Unknown model, preset or key:
    a UserError. ``config.yaml`` keeps the resolved values. Setting ``model`` or
    ``preset`` afterwards resolves the same overrides for the new family or preset (as a
    config file edited by hand would); when they do not fit it, ``model_config`` stays
    the mapping and training says why.
    """

    model: str = "glow"
    preset: str = "small"
    data: str = "fashionmnist"
    model_config: Any = None  # the family's config; a mapping of overrides until resolved
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        given = self.model_config
        overrides = dataclasses.asdict(given) if dataclasses.is_dataclass(given) else dict(given or {})
        object.__setattr__(self, "_overrides", overrides)
        self.model_config = _model_settings(self.model, self.preset, given)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if "_overrides" not in self.__dict__:  # still being constructed
            return
        if name == "model_config" and isinstance(value, dict):
            object.__setattr__(self, "_overrides", dict(value))
        elif name in ("model", "preset"):
            try:
                value = _model_settings(self.model, self.preset, self._overrides)
            except UserError:
                value = dict(self._overrides)  # train_run names what does not fit
            object.__setattr__(self, "model_config", value)


def _model_settings(model: str, preset: str, config: Any) -> Any:
    # the registry builds models (torch): loaded when a run config is made, not for --help
    from .models.registry import model_settings

    return model_settings(model, preset, config)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strings(name: str, values: list | None) -> None:
    if values is not None and not all(isinstance(v, str) and v for v in values):
        raise UserError(f"{name} must be a list of non-empty strings, got {values!r}")


@dataclass
class ScoreConfig:
    """``ood-audit score``: which sets to score and how. One field per option, with the
    option's name (``transforms`` = repeated ``--transform``, ``detectors`` = repeated
    ``--detector``, ``members`` = repeated ``--member``, ``fast_path`` = the fast-path
    flags); an experiment file's ``score:`` section is the same mapping."""

    ood: list[str] = field(default_factory=list)
    limit: int | None = None  # the first N images of each set
    train_limit: int = 2000  # in-distribution train images scored too (0: none)
    batch_size: int = 256  # images per forward pass
    seed: int = 0  # seed of the dequantization noise
    held_out: bool = False  # train rows from after the model's training --limit
    transforms: list[str] = field(default_factory=list)
    detectors: list[str] | None = None  # None: every detector whose needs are met
    members: list[str] = field(default_factory=list)  # other runs of the ensemble
    iw_samples: int | None = None  # VAE: importance samples of the IWAE bound
    workers: int | None = None  # DataLoader processes (None: 2 on CUDA, 0 on CPU)
    fast_path: list[str] = field(default_factory=list)  # Glow fast paths (FAST_PATHS)
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.ood:
            raise UserError("name at least one OOD set to score: --ood mnist (ood: [mnist] "
                            "in an experiment file)")
        for name in ("ood", "transforms", "detectors", "fast_path"):
            _strings(name, getattr(self, name))
        self.members = [str(m) for m in self.members]
        for name in ("limit", "batch_size", "iw_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{_flag(name)} must be positive, got {value}")
        for name in ("train_limit", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"{_flag(name)} must be zero or positive, got {getattr(self, name)}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 0):
            raise UserError(f"--workers must be 0 (dequantize in the scoring process) or a "
                            f"positive number of worker processes, got {self.workers!r}")
        bad = [n for n in self.fast_path if n not in FAST_PATHS]
        if bad:
            raise UserError(f"unknown fast path {bad[0]!r}; choose from {', '.join(FAST_PATHS)}")
        if self.detectors is not None:
            self.detectors = list(dict.fromkeys(self.detectors))
        parse_transforms(self.transforms)  # a bad --transform fails before any work

    def model_options(self) -> dict[str, object]:
        """The scoring options set on the model (``DensityModel.set_score_option``)."""
        options: dict[str, object] = {} if self.iw_samples is None else {"iw_samples": self.iw_samples}
        return {**options, **dict.fromkeys(self.fast_path, True)}


#: Expansion points of ``decompose --second-order``: the shared mean of the
#: in-distribution test set and each OOD set, or the in-distribution test mean.
SECOND_ORDER_CENTERS = ("pooled", "in")


@dataclass
class DecomposeConfig:
    """``ood-audit decompose``: which analyses to run beside the decomposition."""

    csv: bool = False  # decomposition.csv instead of decomposition.parquet
    over_training: bool = False  # rescore a subset with every epoch checkpoint
    over_training_limit: int = 500  # images per set for --over-training
    second_order: bool = False  # the paper's second-order (Hessian trace) prediction
    second_order_limit: int = 500  # images per set for --second-order
    second_order_batch: int = 64  # Hessian-vector products per batch
    second_order_center: str = "pooled"  # the expansion point: SECOND_ORDER_CENTERS
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("over_training_limit", "second_order_limit", "second_order_batch"):
            if getattr(self, name) <= 0:
                raise UserError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.second_order_center not in SECOND_ORDER_CENTERS:
            raise UserError(f"--second-order-center must be one of "
                            f"{', '.join(SECOND_ORDER_CENTERS)}, got {self.second_order_center!r}")


#: Report outputs: --format name -> the file it writes.
REPORT_FORMATS = {"html": "report.html", "md": "report.md", "json": "summary.json"}


def parse_formats(text: str) -> list[str]:
    """``"html,md,json"`` -> ["html", "md", "json"]; UserError for anything else."""
    formats = [f.strip().lower() for f in str(text).split(",") if f.strip()]
    bad = [f for f in formats if f not in REPORT_FORMATS]
    if bad or not formats:
        raise UserError(f"--format {text!r}: choose one or more of {', '.join(REPORT_FORMATS)} "
                        "separated by commas")
    return list(dict.fromkeys(formats))


@dataclass
class ReportConfig:
    """``ood-audit report``: outputs, CI gates and the bootstrap."""

    formats: str = "html,md,json"  # comma-separated REPORT_FORMATS
    gates: list[str] = field(default_factory=list)  # 'DATASET[:DETECTOR]:METRIC OP BOUND'
    n_boot: int = 1000  # bootstrap resamples for the 95% intervals (0: none)
    seed: int = 0  # seed of the bootstrap resampling
    junit: str | None = None  # also a JUnit XML file, one testcase per gate

    def __post_init__(self) -> None:
        parse_formats(self.formats)
        _strings("gates", self.gates)
        if self.n_boot < 0:
            raise UserError(f"--n-boot must be 0 or more, got {self.n_boot}")
        if self.seed < 0:  # numpy's SeedSequence takes non-negative integers only
            raise UserError(f"--seed must be 0 or more, got {self.seed}")


@dataclass
class TrainRequest:
    """The options of ``ood-audit train`` as given; None (or empty) where not given."""

    config_file: Path | None = None  # --config: a RunConfig YAML (examples/demo.yaml)
    model: str | None = None
    data: str | None = None
    preset: str | None = None
    #: TrainConfig fields given as flags (epochs, batch_size, lr, seed, limit, ...)
    train: dict[str, object] = field(default_factory=dict)
    fast_path: list[str] = field(default_factory=list)  # fast-path flags turned on
    out: Path | None = None
    resume: bool = False
    seeds: str | None = None  # "0,1,2": one run per seed
    background: bool = False
    mu: float | None = None  # --background: pixel perturbation rate
    run: Path | None = None  # --background: the run to add a background model to

    def __post_init__(self) -> None:
        self.train = {k: v for k, v in self.train.items() if v is not None}
        if self.seeds is not None and self.background:
            raise UserError("--seeds cannot be combined with --background: train the ensemble, "
                            "then a background model per member with --background --run OUT/seed-<s>")
        if self.background:
            given = [flag for flag, value in (("--model", self.model), ("--data", self.data),
                                              ("--preset", self.preset),
                                              ("--config", self.config_file)) if value is not None]
            if given:
                raise UserError(f"{', '.join(given)} cannot be combined with --background: the "
                                "background model uses the run's own model, preset and data")
            if (self.run is not None and self.out is not None
                    and Path(self.run).resolve() != Path(self.out).resolve()):
                raise UserError("--run and --out name different runs; with --background give the "
                                "run to add a background model to once (--run DIR)")
            return
        if self.seeds is not None and "seed" in self.train:
            raise UserError("--seeds and --seed conflict: --seeds 0,1,2 trains one run per seed, "
                            "--seed S one run")
        for flag, value in (("--mu", self.mu), ("--run", self.run)):
            if value is not None:
                raise UserError(f"{flag} applies to --background only (the likelihood-ratio "
                                "background model); --out names the run directory")

    def run_config(self) -> RunConfig:
        """The ``--config`` file (else the defaults), then the flags over it."""
        raw = load_yaml(self.config_file) if self.config_file else {}
        flags = {k: getattr(self, k) for k in ("model", "data", "preset")
                 if getattr(self, k) is not None}
        where = str(self.config_file) if self.config_file else "train options"
        cfg = from_dict(RunConfig, {**raw, **flags}, where=where)
        overrides = dict(self.train)
        if self.fast_path:  # added to the config file's fast_path, if any
            overrides["fast_path"] = [*cfg.train.fast_path, *self.fast_path]
        if overrides:
            merged = {**dataclasses.asdict(cfg.train), **overrides}
            cfg.train = from_dict(TrainConfig, merged, where="train options")
        return cfg


#: What ``ood-audit import`` reads: a y0ast/Glow-PyTorch or rosinality/glow-pytorch state
#: dict (data only), or a Python file it runs.
IMPORT_KINDS = ("y0ast", "rosinality", "python")


@dataclass
class ImportRequest:
    """The options of ``ood-audit import KIND``; the ones of another kind stay None.

    ``source``: the checkpoint (y0ast, rosinality) or ``FILE.py:FACTORY`` (python).
    ``input_shape`` (python): the per-image shape the module's ``log_prob`` takes, e.g.
    ``"784"`` for a flat flow; None: the data's (C, H, W).
    """

    kind: str
    source: str
    data: str
    out: Path
    hparams: Path | None = None  # y0ast: the hparams.json its train.py writes
    n_flow: int | None = None  # rosinality: flows per block (K)
    n_block: int | None = None  # rosinality: blocks (L)
    affine: bool = False  # rosinality: affine coupling (its train.py's --affine)
    lu: bool = True  # rosinality: LU-decomposed 1x1 convs (False: its --no_lu)
    weights: Path | None = None  # python: a state dict for the module (.safetensors, .pt)
    input_range: str | None = None  # python: INPUT_RANGES; None: 0,1 (or pixels, --discrete)
    discrete: bool = False  # python: log_prob takes uint8 pixels, gives log P(k)
    input_shape: str | None = None  # python: "C,H,W" or "D"

    def __post_init__(self) -> None:
        if self.kind not in IMPORT_KINDS:
            raise UserError(f"unknown import kind {self.kind!r}; choose one of {', '.join(IMPORT_KINDS)}")
        if not str(self.data).strip():
            raise UserError("--data names the set the model was trained on, e.g. --data fashionmnist")
        own = {"y0ast": {"hparams"}, "rosinality": {"n_flow", "n_block", "affine", "lu"},
               "python": {"weights", "input_range", "discrete", "input_shape"}}[self.kind]
        given = [name for name, unset in (("hparams", None), ("n_flow", None), ("n_block", None),
                                          ("affine", False), ("lu", True), ("weights", None),
                                          ("input_range", None), ("discrete", False),
                                          ("input_shape", None))
                 if getattr(self, name) != unset and name not in own]
        if given:
            flags = ["--no-lu" if g == "lu" else _flag(g) for g in given]
            raise UserError(f"{', '.join(flags)} do(es) not apply to import {self.kind}")
        if self.kind == "y0ast" and self.hparams is None:
            raise UserError("import y0ast needs --hparams hparams.json (the file its train.py "
                            "writes beside the checkpoints)")
        if self.kind == "rosinality":
            for name in ("n_flow", "n_block"):
                value = getattr(self, name)
                if value is None or value <= 0:
                    raise UserError(f"import rosinality needs {_flag(name)} N > 0 (its train.py's "
                                    f"--{name}), got {value}")
        if self.kind == "python":
            self.factory_parts()
            self.module_shape()
            if self.discrete and self.input_range is not None:
                raise UserError("--discrete modules take uint8 pixels 0..255: drop --input-range")
            if self.input_range is not None and self.input_range not in INPUT_RANGES:
                raise UserError(f"--input-range {self.input_range!r}: choose one of "
                                f"{', '.join(INPUT_RANGES)}")

    def factory_parts(self) -> tuple[Path, str]:
        """``FILE.py:FACTORY`` -> (FILE, FACTORY); a UserError for any other shape."""
        file, sep, factory = str(self.source).rpartition(":")
        if not sep or not file or not all(p.isidentifier() for p in factory.split(".")):
            raise UserError(f"{self.source!r}: give FILE.py:FACTORY, the file to run and the name "
                            "in it of a function (or class) that returns the module, e.g. "
                            "flow.py:make_flow")
        return Path(file), factory

    def module_shape(self) -> list[int] | None:
        """``--input-shape`` as a list of positive sizes (None when not given)."""
        if self.input_shape is None:
            return None
        try:
            sizes = [int(p) for p in str(self.input_shape).split(",")]
        except ValueError:
            sizes = []
        if not sizes or any(n <= 0 for n in sizes):
            raise UserError(f"--input-shape {self.input_shape!r}: give positive sizes separated "
                            "by commas, e.g. 784 (flat) or 1,28,28")
        return sizes

    @property
    def resolved_input_range(self) -> str:
        return self.input_range or DEFAULT_INPUT_RANGE
