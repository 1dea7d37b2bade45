"""The experiment file: its sections as dataclasses, variants, presets, and loading."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DecomposeConfig, ReportConfig, RunConfig, ScoreConfig, from_dict, load_yaml
from ..errors import UserError
from ..runs import RunDir

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
        super().__post_init__()
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
                         model_config=self.model_config, train=train)


@dataclass
class ReportSection(ReportConfig):
    """``ood-audit report`` options; ``out`` is relative to the experiment's folder."""

    out: str = "report"


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
    score: ScoreConfig | None = None
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
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
    score: ScoreConfig
    decompose: DecomposeConfig
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


def second_order_available() -> bool:
    return importlib.util.find_spec("ood_audit.analysis.second_order") is not None


