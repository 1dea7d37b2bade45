"""One-file experiments: ``ood-audit run EXPERIMENT.yaml`` = train -> score -> decompose -> report.

An experiment file has one section per CLI command (documented in examples/README.md)::

    name: fashionmnist_vs_mnist
    train: {model: glow, preset: small, data: fashionmnist, train: {epochs: 2}, seeds: [0]}
    runs: [{name: glow}, {name: glow-cv, train: {model: glow-cv}}]   # optional
    score: {ood: [mnist, noise-uniform], limit: 2000, transforms: [contrast=0.5]}
    decompose: {over_training: true}
    report: {gates: ["mnist:likelihood:auroc<0.5"]}
    variants: {gpu: {train: {preset: paper}}}                         # optional

Sections parse into dataclasses through :func:`ood_audit.config.from_dict`, so an unknown
key is a one-line UserError naming it. ``train`` is a :class:`~ood_audit.config.RunConfig`
(``examples/demo.yaml``'s format) plus ``seeds``; each entry of ``runs`` deep-merges its
own ``train`` over it. A variant deep-merges over the whole file before parsing.

The steps call the same library functions as the commands (no subprocesses), and each
has the equivalent CLI command, which ``--dry-run`` prints as a shell script. A step
already complete is skipped, so a rerun after an interruption continues: a train step
is complete when the run's checkpoint has reached its epochs with the same config (an
interrupted one resumes); the other steps when ``OUT/experiment.json`` records them
with the same inputs and their output exists, and nothing before them was redone.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import RunConfig, TrainConfig, from_dict, load_yaml, to_dict
from .errors import UserError
from .runs import RunDir, atomic_write_text, run_lock

STEPS = ("train", "score", "decompose", "report")
STATE_FILE = "experiment.json"


@dataclass
class TrainSection(RunConfig):
    """``ood-audit train``'s config (model, preset, data, model_config, train) + seeds.

    ``seeds``: an ensemble, as ``train --seeds``: one member per seed in RUN/seed-<s>
    (``train.seed`` = s) and RUN/ensemble.json; score, decompose and report then work on
    the ensemble folder (member 0, with the others as ensemble members: waic).
    """

    seeds: list | None = None

    def __post_init__(self) -> None:
        if self.seeds is not None:
            if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                         and s >= 0 for s in self.seeds):
                raise UserError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
            if len(set(self.seeds)) != len(self.seeds):
                raise UserError(f"seeds must differ, got {self.seeds!r}")

    def run_config(self, seed: int | None = None) -> RunConfig:
        train = dataclasses.replace(self.train) if seed is None else dataclasses.replace(
            self.train, seed=seed)
        return RunConfig(model=self.model, preset=self.preset, data=self.data,
                         model_config=dict(self.model_config), train=train)


def _strings(name: str, values: list | None) -> None:
    if values is not None and not all(isinstance(v, str) and v for v in values):
        raise UserError(f"{name} must be a list of non-empty strings, got {values!r}")


@dataclass
class ScoreSection:
    """``ood-audit score`` options (same names, ``transforms`` = repeated --transform)."""

    ood: list = field(default_factory=list)
    limit: int | None = None
    train_limit: int = 2000
    batch_size: int = 256
    seed: int = 0
    held_out: bool = False
    transforms: list = field(default_factory=list)
    detectors: list | None = None
    iw_samples: int | None = None

    def __post_init__(self) -> None:
        if not self.ood:
            raise UserError("ood: name at least one OOD set (e.g. ood: [mnist])")
        for name in ("ood", "transforms", "detectors"):
            _strings(name, getattr(self, name))
        for name in ("limit", "batch_size", "iw_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be positive, got {value}")
        if self.train_limit < 0 or self.seed < 0:
            raise UserError("train_limit and seed must be zero or positive")


@dataclass
class DecomposeSection:
    """``ood-audit decompose`` options."""

    over_training: bool = False
    over_training_limit: int = 500
    second_order: bool = False  # the paper's second-order (Hessian trace) analysis
    second_order_limit: int = 500
    second_order_batch: int = 64
    second_order_center: str = "pooled"  # pooled | in


@dataclass
class ReportSection:
    """``ood-audit report`` options; ``out`` is relative to the experiment's folder."""

    gates: list = field(default_factory=list)
    formats: str = "html,md,json"
    n_boot: int = 1000
    seed: int = 0
    out: str = "report"

    def __post_init__(self) -> None:
        _strings("gates", self.gates)


@dataclass
class RunEntry:
    """One model of a multi-run experiment: its folder name and its train overrides."""

    name: str = ""
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise UserError(f"name must be a plain folder name, got {self.name!r}")


@dataclass
class ExperimentFile:
    """The top level of an experiment YAML."""

    name: str = ""
    description: str = ""
    paper: str = ""  # what the paper reports for this experiment (printed, not checked)
    out: str | None = None  # default runs/<name>[-<variant>]
    train: dict = field(default_factory=dict)
    runs: list | None = None
    score: ScoreSection | None = None
    decompose: DecomposeSection = field(default_factory=DecomposeSection)
    report: ReportSection = field(default_factory=ReportSection)
    variants: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise UserError("name: give the experiment a name (it names runs/<name>)")
        if self.score is None:
            raise UserError("score: the section is required (at least score: {ood: [...]})")


@dataclass
class PlannedRun:
    """A trained model of the experiment (an ensemble folder with ``seeds``)."""

    name: str
    config: TrainSection
    root: Path
    members: list[tuple[RunDir, RunConfig]]  # one per seed; the run itself without seeds

    @property
    def ensemble(self) -> bool:
        return self.config.seeds is not None

    @property
    def scored(self) -> RunDir:
        """The folder score/decompose/report work on (an ensemble's holds its scores)."""
        return RunDir(self.root)


@dataclass
class Experiment:
    source: Path
    name: str
    variant: str | None
    paper: str
    out: Path
    runs: list[PlannedRun]
    score: ScoreSection
    decompose: DecomposeSection
    report: ReportSection

    @property
    def report_dir(self) -> Path:
        return self.out / self.report.out


@dataclass
class Step:
    """One command of the experiment: ``argv`` is its CLI equivalent (shell words)."""

    kind: str  # train | score | decompose | report
    id: str
    argv: list[str]
    run: PlannedRun | None = None
    fingerprint: str = ""
    prelude: str = ""  # shell lines the command needs first (a config file)

    def command(self) -> str:
        return (self.prelude + shlex.join(self.argv)).strip()


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_experiment(path: Path, *, variant: str | None = None, preset: str | None = None,
                    out: Path | None = None, device: str | None = None) -> Experiment:
    """Parse and resolve an experiment file; every problem is a UserError naming the key.

    Every variant is checked too, chosen or not, so a typo in ``variants.gpu`` shows on
    the CPU machine rather than on the GPU one.
    """
    path = Path(path)
    raw = load_yaml(path)
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict):
        raise UserError(f"{path}: variants: expected a mapping of name -> overrides")
    for vname, body in variants.items():
        if not isinstance(body, dict) or "variants" in body:
            raise UserError(f"{path}: variants: {vname}: expected a mapping of overrides "
                            "(without a variants key)")
        _resolve(path, deep_merge(raw, body), vname, None, None, None)
    if variant is not None and variant not in variants:
        raise UserError(f"{path}: no variant {variant!r}; defined: {', '.join(variants) or 'none'}")
    if variant is not None:
        raw = deep_merge(raw, variants[variant])
    return _resolve(path, raw, variant, preset, out, device,
                    own_out=variant is not None and "out" in variants[variant])


def _resolve(path: Path, raw: dict, variant: str | None, preset: str | None, out: Path | None,
             device: str | None, own_out: bool = False) -> Experiment:
    where = str(path) + (f" (variant {variant})" if variant else "")
    spec = _parse(raw, where)
    if out is None:  # a variant writes next to the base experiment unless it names a folder
        base = Path(spec.out) if spec.out else Path("runs") / spec.name
        out = base if variant is None or own_out else base.with_name(f"{base.name}-{variant}")
    runs = []
    for entry in spec.runs or [RunEntry(name=str(spec.train.get("model", "glow")))]:
        merged = deep_merge(spec.train, entry.train)
        if preset is not None:
            merged["preset"] = preset
        if device is not None:
            merged = deep_merge(merged, {"train": {"device": device}})
        label = f"{where}: train" + (f" (run {entry.name})" if spec.runs else "")
        cfg = from_dict(TrainSection, merged, where=label)
        _check_model(cfg, label)
        root = Path(out) / entry.name
        members = ([(RunDir(root / f"seed-{s}"), cfg.run_config(s)) for s in cfg.seeds]
                   if cfg.seeds else [(RunDir(root), cfg.run_config())])
        runs.append(PlannedRun(entry.name, cfg, root, members))
    if len({r.name for r in runs}) != len(runs):
        raise UserError(f"{where}: runs: names must differ")
    if spec.decompose.second_order and not second_order_available():
        raise UserError(f"{where}: decompose: second_order is not available in this version "
                        "of ood-audit (no ood_audit.analysis.second_order); remove the key")
    return Experiment(path, spec.name, variant, spec.paper.strip(), Path(out), runs, spec.score,
                      spec.decompose, spec.report)


def _parse(raw: dict, where: str) -> ExperimentFile:
    spec = from_dict(ExperimentFile, raw, where=where)
    if spec.runs is not None:
        if not spec.runs:
            raise UserError(f"{where}: runs: give one entry or more, or leave the key out")
        spec.runs = [from_dict(RunEntry, e, where=f"{where}: runs[{i}]")
                     for i, e in enumerate(spec.runs)]
    return spec


def _check_model(cfg: TrainSection, where: str) -> None:
    """Model and preset names (and model_config keys) fail at load time, not mid-run."""
    from .models.registry import MODELS, get_spec

    if cfg.model not in MODELS:
        raise UserError(f"{where}: unknown model {cfg.model!r}; choose one of: {', '.join(MODELS)}")
    spec = get_spec(cfg.model)
    if cfg.preset not in spec.presets:
        raise UserError(f"{where}: model {cfg.model!r} has no preset {cfg.preset!r}; "
                        f"choose one of: {', '.join(spec.presets)}")
    from_dict(spec.config_cls, {**spec.presets[cfg.preset], **cfg.model_config},
              where=f"{where}: model_config")


def second_order_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ood_audit.analysis.second_order") is not None


# ---------------------------------------------------------------- the steps and their commands

def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: RunConfig.train fields that ``ood-audit train`` has a flag for.
_TRAIN_FLAGS = ("epochs", "batch_size", "lr", "seed", "limit", "keep_checkpoints",
                "weight_decay", "device")


def train_argv(rd: RunDir, cfg: RunConfig, seeds: list | None = None) -> tuple[list[str], str]:
    """``ood-audit train`` for ``cfg``: flags when they say it all, else a --config file
    written by a shell here-document (the returned prelude)."""
    default = TrainConfig()
    if seeds:  # train --seeds sets each member's seed
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=default.seed))
        rest = ["--seeds", ",".join(map(str, seeds))]
        argv, prelude = train_argv(rd, cfg)
        return argv[:-2] + rest + argv[-2:], prelude
    rest = {k: v for k, v in to_dict(cfg.train).items() if k not in _TRAIN_FLAGS}
    if cfg.model_config or rest != {k: v for k, v in to_dict(default).items() if k in rest}:
        conf = rd.root.parent / f"{rd.root.name}.train.yaml"
        # Only what differs from the defaults: the file reads like examples/demo.yaml.
        short = {"model": cfg.model, "preset": cfg.preset, "data": cfg.data,
                 **({"model_config": cfg.model_config} if cfg.model_config else {}),
                 "train": {k: v for k, v in to_dict(cfg.train).items() if v != getattr(default, k)}}
        text = yaml.safe_dump(short, sort_keys=False)
        prelude = (f"mkdir -p {shlex.quote(str(conf.parent))}\n"
                   f"cat > {shlex.quote(str(conf))} <<'EOF'\n{text}EOF\n")
        return ["ood-audit", "train", "--config", str(conf), "--out", str(rd.root)], prelude
    argv = ["ood-audit", "train", "--model", cfg.model, "--data", cfg.data, "--preset", cfg.preset]
    for key in _TRAIN_FLAGS:
        value = getattr(cfg.train, key)
        if value is not None and value != getattr(default, key):
            argv += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return argv + ["--out", str(rd.root)], ""


def plan(exp: Experiment, data_root: Path | None = None) -> list[Step]:
    """Every step of the experiment in order, with its CLI equivalent and fingerprint."""
    s, d, r = exp.score, exp.decompose, exp.report
    extra = ["--data-root", str(data_root)] if data_root is not None else []
    steps: list[Step] = []
    for run in exp.runs:
        argv, prelude = train_argv(run.scored, run.config.run_config(), run.config.seeds)
        steps.append(Step("train", f"train:{run.root}", argv + extra, run,
                          _digest([_comparable(cfg) for _, cfg in run.members]), prelude))
    for run in exp.runs:
        rd = run.scored
        argv = ["ood-audit", "score", "--run", str(rd.root)]
        for name in s.ood:
            argv += ["--ood", name]
        if s.limit is not None:
            argv += ["--limit", str(s.limit)]
        argv += ["--train-limit", str(s.train_limit), "--batch-size", str(s.batch_size),
                 "--seed", str(s.seed)]
        argv += ["--held-out"] if s.held_out else []
        for t in s.transforms:
            argv += ["--transform", t]
        for det in s.detectors or []:
            argv += ["--detector", det]
        if s.iw_samples is not None:
            argv += ["--iw-samples", str(s.iw_samples)]
        steps.append(Step("score", f"score:{rd.root}", argv + extra, run,
                          _digest(to_dict(s), [str(m.root) for m, _ in run.members])))
    so = ["--second-order", "--second-order-limit", str(d.second_order_limit),
          "--second-order-batch", str(d.second_order_batch),
          "--second-order-center", d.second_order_center] if d.second_order else []
    for run in exp.runs:
        rd = run.scored
        argv = ["ood-audit", "decompose", "--run", str(rd.root)]
        if d.over_training:
            argv += ["--over-training", "--over-training-limit", str(d.over_training_limit)]
        argv += so
        steps.append(Step("decompose", f"decompose:{rd.root}", argv + extra, run,
                          _digest(to_dict(d))))
    argv = ["ood-audit", "report", *(str(run.scored.root) for run in exp.runs),
            "--out", str(exp.report_dir), "--format", r.formats, "--n-boot", str(r.n_boot),
            "--seed", str(r.seed)]
    for gate in r.gates:
        argv += ["--gate", gate]
    steps.append(Step("report", "report", argv, None,
                      _digest(to_dict(r), [str(run.scored.root) for run in exp.runs])))
    return steps


def _comparable(cfg: RunConfig, epochs: bool = True) -> dict:
    """The config as stored in config.yaml, minus the device (where it ran, not what)."""
    data = to_dict(cfg)
    data["train"].pop("device", None)
    if not epochs:
        data["train"].pop("epochs", None)
    return data


# ---------------------------------------------------------------- running an experiment

class ExperimentHooks:
    """What the CLI shows while an experiment runs; the defaults stay silent."""

    def log(self, message: str) -> None:
        """A one-line notice."""

    def step_start(self, step: Step, index: int, total: int, action: str) -> None:
        """Step ``index`` (1-based) of ``total`` starts; ``action`` says how (resume...)."""

    def step_skip(self, step: Step, index: int, total: int, why: str) -> None:
        """Step ``index`` is complete already and is skipped."""

    def step_end(self, step: Step, seconds: float, result: object) -> None:
        """A step finished; ``result`` is what its library call returned."""

    def train_progress(self):
        """A :class:`~ood_audit.training.trainer.TrainProgress` for a train step, or None."""
        return None

    def score_progress(self):
        """A context manager yielding a ScoreProgress (or None) for score/over-training."""
        import contextlib

        return contextlib.nullcontext(None)


@dataclass
class ExperimentResult:
    out: Path
    seconds: float
    ran: list[str]
    skipped: list[str]
    gates_passed: bool = True
    gate_detail: str = ""
    report_files: list[str] = field(default_factory=list)


def _stored_config(rd: RunDir) -> RunConfig | None:
    try:
        return from_dict(RunConfig, load_yaml(rd.config), where=str(rd.config))
    except UserError:
        return None


def train_status(rd: RunDir, cfg: RunConfig) -> str:
    """``done``, ``resume`` (same config, epochs left) or ``new``; a UserError when the
    folder holds another run, which only ``--force`` (or another --out) may replace."""
    from .training.run import _checkpoint_epoch

    if not rd.config.exists():
        if rd.model.exists() or rd.train_state.exists():
            raise UserError(f"{rd.root} holds a run without config.yaml: rerun with --force "
                            "to retrain it, or pass another --out")
        return "new"
    stored = _stored_config(rd)
    # Epochs may grow (the run resumes and trains longer; config.yaml keeps its first value).
    if stored is None or _comparable(stored, epochs=False) != _comparable(cfg, epochs=False):
        have = _comparable(stored, epochs=False) if stored else {}
        want = _comparable(cfg, epochs=False)
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if "train" in diff:
            diff.remove("train")
            diff += [f"train.{k}" for k in sorted(want["train"])
                     if have.get("train", {}).get(k) != want["train"][k]]
        raise UserError(f"{rd.root} holds a run trained with another config ({', '.join(diff)} "
                        "differ): rerun with --force to retrain it, or pass another --out")
    trained = _checkpoint_epoch(rd.model)
    if trained > cfg.train.epochs:
        raise UserError(f"{rd.root} is trained for {trained} epochs, more than the {cfg.train.epochs} "
                        "asked for: rerun with --force to retrain it, or pass another --out")
    return "done" if trained == cfg.train.epochs else "resume"


def run_status(run: PlannedRun) -> str:
    """:func:`train_status` of a run, or of an ensemble (``resume`` when half-trained)."""
    root = RunDir(run.root)
    if run.ensemble and (root.config.exists() or (root.root / "model.safetensors").exists()):
        raise UserError(f"{root.root} holds a single run, not an ensemble of seeds: rerun with "
                        "--force to retrain it, or pass another --out")
    if not run.ensemble and (root.root / "ensemble.json").exists():
        raise UserError(f"{root.root} holds an ensemble (ensemble.json), not a single run: rerun "
                        "with --force to retrain it, or pass another --out")
    found = {train_status(rd, cfg) for rd, cfg in run.members}
    return found.pop() if len(found) == 1 else "resume"


def _outputs(step: Step, exp: Experiment) -> list[Path]:
    if step.kind == "score":
        return [step.run.scored.scores]
    if step.kind == "decompose":
        rd = step.run.scored
        return ([rd.decomposition] + ([rd.over_training] if exp.decompose.over_training else [])
                + ([rd.second_order] if exp.decompose.second_order else []))
    from .report.build import FORMAT_FILES, parse_formats

    return [exp.report_dir / FORMAT_FILES[f] for f in parse_formats(exp.report.formats)]


def statuses(exp: Experiment, steps: list[Step], force: bool = False) -> list[str]:
    """Per step: ``done`` (skip), ``new``, or ``resume`` (a train step left half-way)."""
    state = read_state(exp.out).get("steps", {})
    out: list[str] = []
    redone: set[str] = set()  # names of runs with a step to redo: their later steps follow
    for step in steps:
        if step.kind == "train":
            status = "new" if force else run_status(step.run)
        else:
            recorded = state.get(step.id, {}).get("fingerprint")
            upstream = bool(redone) if step.run is None else step.run.name in redone
            fresh = recorded == step.fingerprint and all(p.exists() for p in _outputs(step, exp))
            status = "done" if fresh and not upstream and not force else "new"
        if status != "done" and step.run is not None:
            redone.add(step.run.name)
        out.append(status)
    return out


def read_state(out: Path) -> dict:
    path = Path(out) / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(exp: Experiment, step: Step, record: dict) -> None:
    state = read_state(exp.out)
    state.update(experiment=exp.name, source=str(exp.source), variant=exp.variant)
    state.setdefault("steps", {})[step.id] = {"fingerprint": step.fingerprint, "command": step.command(),
                                              **record}
    atomic_write_text(exp.out / STATE_FILE, json.dumps(state, indent=2) + "\n")


def check_data(exp: Experiment, steps: list[Step], status: list[str], *,
               data_root: Path | None, download: bool) -> None:
    """Fail before any work when a data set a pending step needs is missing: the data
    registry's one-line error names the files expected and where."""
    from .data import DATASETS, load_dataset

    if download:
        return  # the steps fetch what is missing
    wanted: dict[tuple[str, str], None] = {}
    for step, st in zip(steps, status, strict=True):
        if st == "done":
            continue
        if step.kind == "train":
            wanted[step.run.config.data, "train"] = None
        elif step.kind == "score":
            wanted[step.run.config.data, "test"] = None
            for name in exp.score.ood:
                wanted[name, "test"] = None
    for name, split in wanted:
        spec = DATASETS.get(name)
        if spec is not None and spec.shape is None:
            continue  # synthetic: made on the fly in the model's shape
        load_dataset(name, split, root=data_root, limit=1)


def run_experiment(exp: Experiment, *, force: bool = False, data_root: Path | None = None,
                   download: bool = False, hooks: ExperimentHooks | None = None) -> ExperimentResult:
    """Run every step not yet complete, in order; see the module docstring."""
    hooks = hooks or ExperimentHooks()
    steps = plan(exp, data_root)
    start = time.perf_counter()
    result = ExperimentResult(exp.out, 0.0, [], [])
    # Missing data fails before anything is written (the lock would create the folder).
    check_data(exp, steps, statuses(exp, steps, force), data_root=data_root, download=download)
    with run_lock(RunDir(exp.out), "ood-audit run"):
        status = statuses(exp, steps, force)
        for i, (step, st) in enumerate(zip(steps, status, strict=True), 1):
            if st == "done":
                hooks.step_skip(step, i, len(steps), _skip_reason(step))
                result.skipped.append(step.id)
                if step.kind == "report":
                    rec = read_state(exp.out)["steps"][step.id]
                    result.gates_passed, result.gate_detail = rec["gates_passed"], rec["gate_detail"]
                    result.report_files = [str(p) for p in _outputs(step, exp)]
                continue
            hooks.step_start(step, i, len(steps), st)
            t0 = time.perf_counter()
            value, record = _execute(exp, step, st, force=force, data_root=data_root,
                                     download=download, hooks=hooks)
            seconds = time.perf_counter() - t0
            _write_state(exp, step, {"seconds": round(seconds, 1), **record})
            result.ran.append(step.id)
            if step.kind == "report":
                result.gates_passed, result.gate_detail = value.passed, record["gate_detail"]
                result.report_files = [str(p) for p in value.files.values()]
            hooks.step_end(step, seconds, value)
    result.seconds = time.perf_counter() - start
    return result


def _skip_reason(step: Step) -> str:
    if step.kind == "train":
        return "trained to its last epoch with this config"
    return "done with these inputs (experiment.json)"


def _execute(exp: Experiment, step: Step, status: str, *, force: bool, data_root: Path | None,
             download: bool, hooks: ExperimentHooks) -> tuple[object, dict]:
    """Call the library function behind ``step``; returns its value and what to record."""
    from .runs import refuse_if_locked

    if step.kind == "train":
        from .training.run import train_run

        run, cfg = step.run, step.run.config
        if force and run.root.exists():  # redo from scratch
            refuse_if_locked(RunDir(run.root))
            shutil.rmtree(run.root)
        elif status == "new" and run.ensemble:  # killed before its first member's config
            (run.root / "ensemble.json").unlink(missing_ok=True)
        common = dict(resume=status == "resume", resume_epochs=cfg.train.epochs, data_root=data_root,
                      download=download, log=hooks.log, progress=hooks.train_progress())
        if run.ensemble:
            from .training.ensemble import train_ensemble

            outcomes = train_ensemble(cfg.run_config(), run.root, list(cfg.seeds), **common)
        else:
            outcomes = [train_run(cfg.run_config(), run.root, point_latest=False, **common)]
        return outcomes, {"test_bpd": {str(o.run_dir): o.results[-1].test_bpd if o.results else None
                                       for o in outcomes}}
    rd = step.run.scored if step.run is not None else None
    device = step.run.config.train.device if step.run is not None else "auto"
    if step.kind == "score":
        from .scoring.scorer import score_run

        s = exp.score
        with run_lock(rd, "ood-audit score"), hooks.score_progress() as progress:
            summaries = score_run(
                rd, list(s.ood), root=data_root, download=download, limit=s.limit,
                train_limit=s.train_limit, batch_size=s.batch_size, device=device, seed=s.seed,
                notify=hooks.log, progress=progress,
                options={"iw_samples": s.iw_samples} if s.iw_samples is not None else None,
                detectors=s.detectors,
                held_out=s.held_out, transforms=list(s.transforms))
        return summaries, {"mean_bpd": {f"{x.dataset}|{x.split}|{x.transform}": round(x.means["bpd"], 4)
                                        for x in summaries}}
    if step.kind == "decompose":
        from .analysis import decomposition as dec
        from .analysis.tables import load_run_scores

        with run_lock(rd, "ood-audit decompose"):
            df, meta = load_run_scores(rd)
            table = dec.decompose(df, meta)
            dec.write_decomposition(table, rd.decomposition)
            over = None
            if exp.decompose.over_training:
                from .analysis.over_training import over_training

                with hooks.score_progress() as progress:
                    over = over_training(rd, list(exp.score.ood), limit=exp.decompose.over_training_limit,
                                         root=data_root, download=download, device=device,
                                         progress=progress)
            second = None
            if exp.decompose.second_order:
                from .analysis.second_order import second_order_run

                d = exp.decompose
                second = second_order_run(rd, list(exp.score.ood), limit=d.second_order_limit,
                                          root=data_root, download=download,
                                          batch_size=d.second_order_batch, device=device,
                                          seed=meta.dequant_seed, center=d.second_order_center)
        return (table, dec.gaps(table), over, second), {}
    from .report.build import build_report, parse_formats

    r = exp.report
    report = build_report([run.scored for run in exp.runs], exp.report_dir, parse_formats(r.formats),
                          list(r.gates), n_boot=r.n_boot, seed=r.seed)
    detail = "; ".join(g.detail for g in report.failed)
    return report, {"gates_passed": report.passed, "gate_detail": detail}
