"""Any ``torch.nn.Module`` with a log-density, as a :class:`~.base.DensityModel`.

``ood-audit import python FILE.py:FACTORY`` runs FILE as Python, calls ``FACTORY()`` and
wraps the module it returns in :class:`ImportedModel`, the ``imported`` family of the
registry. A run keeps FILE's path and sha256 in its model config, so ``score`` rebuilds
the module the same way, after checking that FILE still has the same bytes
(:func:`build_imported`); the module's weights travel in the run's checkpoint.

The rules, the one place they are written (the Python API's :func:`wrap_module` of a
module in memory uses the same class), per batch of dequantized x in [0, 1)^D
(``[B, C, H, W]``, :mod:`ood_audit.data.preprocess`):

- continuous (default): the module takes y = a x + b (``--input-range``,
  :data:`~.input_ranges.INPUT_RANGES`) and returns log p(y) in nats, shape ``[B]``; the
  change of variables gives log p(x) = log p(y) + D log|a|, written as the term
  :data:`INPUT_TERM` when a != 1;
- discrete (``--discrete``): the module takes uint8 pixels k = floor(256 x) and returns
  log P(k); log p(x) = log P(k) + D log 256 (the density of the dequantized image, as
  ood-audit's PixelCNN++ and VAE report; Nalisnick et al. 2019), the constant written as
  :data:`DISCRETE_TERM`. No input range applies.

The module's own terms, first found of: its ``log_prob_terms(y)`` (ood-audit's
interface: a dict of ``[B]`` terms), a flow library's adapter (:mod:`.adapters`: log p(z)
and the log|det| per transform), else its ``log_prob(y)`` as the one term ``log_prob``.
Each must be a float ``[B]``. The input reaches the module in ``module_shape`` (default
the image's (C, H, W); ``(D,)`` for a flat flow) and the dtype of its parameters. The
module is called in eval mode; a module that raises says so in one line naming FILE.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from ..data.preprocess import LOG_N_BINS
from ..errors import UserError
from ..provenance import file_sha256
from .adapters import Adapter, adapter_for
from .base import DensityModel
from .discretized import pixels_from_unit
from .input_ranges import DEFAULT_INPUT_RANGE, INPUT_RANGES

#: D log|a| of the input range's change of variables (continuous modules, a != 1).
INPUT_TERM = "logdet_input"
#: D log 256: log p(x) of the dequantized image minus log P(k) (discrete modules).
DISCRETE_TERM = "discrete_offset"
#: The one term of a module that has only ``log_prob``.
PLAIN_TERM = "log_prob"


@dataclass
class ImportedConfig:
    """What rebuilds an imported module: the file run, the factory called, and how its
    input is made. ``file_sha256`` is checked before the file runs again."""

    file: str  # absolute path of the Python file
    factory: str  # name in it of the callable returning the module
    file_sha256: str
    input_range: str = DEFAULT_INPUT_RANGE
    discrete: bool = False
    module_shape: list[int] | None = None  # per-image shape log_prob takes; None: (C, H, W)

    def __post_init__(self) -> None:
        if self.input_range not in INPUT_RANGES:
            raise UserError(f"input_range {self.input_range!r}: choose one of "
                            f"{', '.join(INPUT_RANGES)}")
        if self.discrete and self.input_range != DEFAULT_INPUT_RANGE:
            raise UserError("a discrete module takes the uint8 pixels, so no input range applies "
                            f"(got {self.input_range!r}): drop --input-range (input_range)")


class ImportedModel(DensityModel):
    """A user's module as a density over dequantized images x in [0, 1)^D (module docstring)."""

    def __init__(self, module: nn.Module, config: ImportedConfig, input_shape: tuple[int, int, int]):
        super().__init__()
        self.module = module
        self.config = config
        self.input_shape = tuple(input_shape)
        self.n_dims = math.prod(self.input_shape)
        self.module_shape = tuple(config.module_shape or self.input_shape)
        if math.prod(self.module_shape) != self.n_dims:
            raise UserError(f"--input-shape {','.join(map(str, self.module_shape))} holds "
                            f"{math.prod(self.module_shape)} values, the data's images "
                            f"{'x'.join(map(str, self.input_shape))} hold {self.n_dims}")
        self.scale, self.shift = INPUT_RANGES[config.input_range]
        self.own_terms = callable(getattr(module, "log_prob_terms", None))
        self.adapter: Adapter | None = None if self.own_terms else adapter_for(module)
        if not (self.own_terms or self.adapter or callable(getattr(module, "log_prob", None))):
            raise UserError(f"{self._where()} gave a {type(module).__name__}, which has no "
                            "log_prob(x) (nor log_prob_terms(x)) and is no normflows, nflows or "
                            "zuko flow: nothing to score")

    @property
    def family(self) -> str:
        """How the scores of a module scored from memory name the model: the flow library
        whose adapter gives the terms, else ``python``."""
        return self.adapter.name if self.adapter is not None else "python"

    @property
    def source(self) -> str:
        """How the terms are computed: ``log_prob_terms``, ``adapter:<library>`` or ``log_prob``."""
        if self.own_terms:
            return "log_prob_terms"
        return f"adapter:{self.adapter.name}" if self.adapter is not None else "log_prob"

    def module_input(self, x: Tensor) -> Tensor:
        """x in [0, 1)^D ``[B, C, H, W]`` -> what the module takes, in ``module_shape``."""
        shape = (x.shape[0], *self.module_shape)
        if self.config.discrete:
            return pixels_from_unit(x).to(torch.uint8).reshape(shape)
        x = x.to(_dtype_of(self.module))
        y = x if (self.scale, self.shift) == (1.0, 0.0) else x * self.scale + self.shift
        return y.reshape(shape)

    def log_prob_terms(self, x: Tensor) -> dict[str, Tensor]:
        terms = self._module_terms(self.module_input(x), len(x))
        if self.config.discrete:
            constant, name = self.n_dims * LOG_N_BINS, DISCRETE_TERM
        elif self.scale != 1.0:  # the change of variables x -> a x + b
            constant, name = self.n_dims * math.log(abs(self.scale)), INPUT_TERM
        else:
            return terms
        if name in terms:
            raise UserError(f"{self._where()} names a term {name!r}, which ood-audit adds "
                            "itself: rename it")
        first = next(iter(terms.values()))
        return {**terms, name: torch.full((len(x),), constant, dtype=first.dtype, device=first.device)}

    def _module_terms(self, y: Tensor, batch: int) -> dict[str, Tensor]:
        try:
            if self.own_terms:
                out, call = self.module.log_prob_terms(y), "log_prob_terms"
            elif self.adapter is not None:
                out, call = self.adapter.terms(self.module, y), f"the {self.adapter.name} adapter"
            else:
                out, call = {PLAIN_TERM: self.module.log_prob(y)}, "log_prob"
        except (UserError, MemoryError, torch.cuda.OutOfMemoryError):
            raise  # the scorer halves its batch on out-of-memory
        except Exception as exc:  # noqa: BLE001 - the user's code: one line, not our traceback
            raise UserError(f"{self._where()}: log_prob raised {_describe(exc, self.config.file)}"
                            ) from exc
        return self._checked(out, call, batch)

    def _checked(self, out: object, call: str, batch: int) -> dict[str, Tensor]:
        if not isinstance(out, Mapping) or not out:
            raise UserError(f"{self._where()}: {call} returned a {type(out).__name__}, not a "
                            "non-empty dict of per-sample terms")
        for name, value in out.items():
            if not isinstance(name, str) or not name:
                raise UserError(f"{self._where()}: {call} gave a term named {name!r}: names "
                                "must be non-empty strings")
            if not isinstance(value, Tensor) or tuple(value.shape) != (batch,):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                which = call if call == name else f"{call} ({name})"
                raise UserError(f"{self._where()}: {which} gave shape {got} for a batch "
                                f"of {batch}; it must give one value per image, shape "
                                f"[{batch}] (--input-shape says which shape the module takes)")
            if not value.is_floating_point():
                raise UserError(f"{self._where()}: {call} ({name}) gave {value.dtype} values; "
                                "log-densities are floats")
        return dict(out)

    def extra_metadata(self) -> dict[str, str]:
        return {"class": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
                "terms_from": self.source, "input_range": self.config.input_range,
                "discrete": str(self.config.discrete).lower()}

    def _where(self) -> str:
        return f"{self.config.file}:{self.config.factory}" if self.config.factory else self.config.file


def wrap_module(module: nn.Module, input_shape: tuple[int, int, int], *,
                input_range: str = DEFAULT_INPUT_RANGE, discrete: bool = False,
                module_shape: list[int] | None = None, name: str | None = None) -> ImportedModel:
    """A module already in memory (a notebook's) as the same wrapper, without a file: for
    the Python API (``ood_audit.audit``). ``name`` stands for the file in messages (default
    the module's class). Nothing is hash-checked; the module is put in eval mode."""
    if not isinstance(module, nn.Module):
        hint = (" (a zuko flow: pass the flow module, not flow())"
                if isinstance(module, torch.distributions.Distribution) else "")
        raise UserError(f"expected a torch.nn.Module, got {type(module).__name__}{hint}")
    config = ImportedConfig(file=name or type(module).__name__, factory="", file_sha256="",
                            input_range=input_range, discrete=discrete, module_shape=module_shape)
    return ImportedModel(module, config, tuple(int(n) for n in input_shape)).eval()


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The floating dtype of the module's first parameter or buffer (float32 if none)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# ------------------------------------------------------------------- running user code
def run_file(path: Path, sha256: str) -> ModuleType:
    """Run the Python file ``path`` as a module (once per content: a second call with the
    same sha256 returns the module already run). Its folder goes first on ``sys.path``
    so it can import modules beside it. UserError naming the line for any exception."""
    path = Path(path)
    name = f"ood_audit_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{sha256[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path} cannot be run as Python: give a .py file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code: one line
        del sys.modules[name]
        raise UserError(f"running {path} raised {_describe(exc, str(path))}: fix the file and "
                        "import again") from None
    return module


def call_factory(module: ModuleType, factory: str, where: str) -> nn.Module:
    """``module.<factory>()``, with torch's RNG seeded (0) and then restored, so a factory
    that draws random numbers builds the same module every time it is called."""
    target: object = module
    for part in factory.split("."):
        target = getattr(target, part, None)
        if target is None:
            names = sorted(n for n, v in vars(module).items()
                           if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == module.__name__)
            raise UserError(f"{where} has no {factory!r}; callables defined in it: "
                            f"{', '.join(names) or 'none'}")
    if not callable(target):
        raise UserError(f"{where}:{factory} is a {type(target).__name__}, not a callable that "
                        "returns a torch.nn.Module")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = target()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code: one line
        raise UserError(f"{where}:{factory}() raised {_describe(exc, where)}") from None
    if not isinstance(built, nn.Module):
        raise UserError(f"{where}:{factory}() returned {type(built).__name__} {built!r:.40}, "
                        "not a torch.nn.Module")
    return built


def build_imported(config: ImportedConfig, input_shape: tuple[int, int, int]) -> ImportedModel:
    """The ``imported`` family's build: check FILE's sha256, run it, call the factory, wrap.
    The weights come after, from the checkpoint (``load_state_dict``)."""
    path = Path(config.file)
    if not path.is_file():
        raise UserError(f"the module file {path} is gone: put it back, or import the model "
                        "again (ood-audit import python FILE.py:FACTORY ... --out NEW_RUN)")
    now = file_sha256(path)
    if now != config.file_sha256:
        raise UserError(f"{path} has changed since it was imported (sha256 "
                        f"{config.file_sha256[:12]}... then, {now[:12]}... now); it is not run: "
                        "restore it, or import it again into a new run")
    module = call_factory(run_file(path, now), config.factory, str(path))
    return ImportedModel(module, config, input_shape).eval()


def _describe(exc: BaseException, file: str) -> str:
    """``ValueError: bad thing (line 12)``: the exception and the last line of ``file``
    it passed through."""
    text = str(exc).strip().splitlines()
    where = [f for f in traceback.extract_tb(exc.__traceback__)
             if Path(f.filename).name == Path(file.split(":")[0]).name]
    message = f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
    return message + (f" (line {where[-1].lineno})" if where else "")
