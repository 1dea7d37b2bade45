"""MODELS: the one registry of model families. The CLI takes its choices from it.

Each entry knows its config dataclass, its presets, fixed settings that define the
family (``glow-cv`` is Glow with additive coupling), and how to build the model for an
input shape.

Two more kinds of family are found by :func:`get_spec`: those other packages register
through the entry-point group ``ood_audit.models`` (:mod:`.plugins`; trained like the
built-in ones), and :data:`LOAD_ONLY`, families a checkpoint can hold that ``train``
does not train (``imported``: a module from ``ood-audit import python``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..parsing import from_dict
from .base import DensityModel
from .catalog import MODEL_FAMILIES
from .glow import GLOW_PRESETS, Glow, GlowConfig, fit_levels
from .glow_convert import GLOW_ARCH, upgrade_arch1
from .hvae import HVAE, HVAE_PRESETS, HVAEConfig
from .imported import ImportedConfig, build_imported
from .pixelcnn import PIXELCNN_PRESETS, PixelCNN, PixelCNNConfig, fit_resolutions
from .plugins import load_plugins
from .vae import VAE, VAE_PRESETS, VAEConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str
    config_cls: type
    presets: dict[str, dict[str, Any]]
    #: settings that define the family; a user override of these is an error
    fixed: dict[str, Any] = field(default_factory=dict)
    #: (config, input_shape) -> (config fitted to the shape, note or None)
    fit: Callable[[Any, tuple[int, int, int]], tuple[Any, str | None]] = lambda c, s: (c, None)
    build: Callable[[Any, tuple[int, int, int]], DensityModel] = None  # type: ignore[assignment]
    #: architecture version written into checkpoints (metadata ``arch``); bumped when the
    #: same config builds other layers, so an older checkpoint is upgraded or refused
    arch: int = 1
    #: (config, state dict, input shape, where) of an arch-1 checkpoint -> today's
    #: (config, state dict) computing the same function; None: older ones are refused
    upgrade: Callable[..., tuple[Any, dict]] | None = None
    #: the terms the family writes, in words, for ``ood-audit models``; None: read off a
    #: model of its smallest preset
    terms: str | None = None


MODELS: dict[str, ModelSpec] = {
    "glow": ModelSpec(
        name="glow",
        summary=MODEL_FAMILIES["glow"],
        config_cls=GlowConfig,
        presets=GLOW_PRESETS,
        fixed={"coupling": "affine"},
        fit=fit_levels,
        build=Glow,
        arch=GLOW_ARCH,
        upgrade=upgrade_arch1,
    ),
    "glow-cv": ModelSpec(
        name="glow-cv",
        summary=MODEL_FAMILIES["glow-cv"],
        config_cls=GlowConfig,
        presets=GLOW_PRESETS,
        fixed={"coupling": "additive"},
        fit=fit_levels,
        build=Glow,
        arch=GLOW_ARCH,
        upgrade=upgrade_arch1,
    ),
    "vae": ModelSpec(
        name="vae",
        summary=MODEL_FAMILIES["vae"],
        config_cls=VAEConfig,
        presets=VAE_PRESETS,
        fixed={},
        build=VAE,
    ),
    "pixelcnn": ModelSpec(
        name="pixelcnn",
        summary=MODEL_FAMILIES["pixelcnn"],
        config_cls=PixelCNNConfig,
        presets=PIXELCNN_PRESETS,
        fixed={},
        fit=fit_resolutions,
        build=PixelCNN,
    ),
    "hvae": ModelSpec(
        name="hvae",
        summary=MODEL_FAMILIES["hvae"],
        config_cls=HVAEConfig,
        presets=HVAE_PRESETS,
        fixed={},
        build=HVAE,
    ),
}


#: Families a checkpoint can hold that ``ood-audit train`` does not train.
LOAD_ONLY: dict[str, ModelSpec] = {
    "imported": ModelSpec(
        name="imported",
        summary="a torch module from ood-audit import python FILE.py:FACTORY (rebuilt from "
                "its file, sha256-checked)",
        config_cls=ImportedConfig,
        presets={},
        build=build_imported,
        terms="the module's log_prob_terms, a flow library's terms, or log_prob; plus "
              "logdet_input (D log|a| of --input-range, when a != 1) or discrete_offset (D log 256, --discrete)",
    ),
}


def plugin_specs() -> tuple[dict[str, ModelSpec], dict[str, str]]:
    """({name: spec} of the plugin families that load, {name: why not} of the others)."""
    return load_plugins(ModelSpec, set(MODELS) | set(LOAD_ONLY))


def trainable_specs() -> dict[str, ModelSpec]:
    """The families ``ood-audit train`` trains: the built-in ones, then the plugins'."""
    return {**MODELS, **plugin_specs()[0]}


def get_spec(name: str) -> ModelSpec:
    """The family ``name``: built-in, a plugin's, or load-only; else a one-line UserError."""
    if name in MODELS:
        return MODELS[name]
    if name in LOAD_ONLY:
        return LOAD_ONLY[name]
    plugins, errors = plugin_specs()
    if name in plugins:
        return plugins[name]
    if name in errors:
        raise UserError(errors[name])
    raise UserError(f"unknown model {name!r}; choose one of: {', '.join([*MODELS, *plugins])}")


def model_settings(name: str, preset: str, config: Any = None) -> Any:
    """The config dataclass of model ``name``: its preset, then ``config`` (a mapping of
    overrides, or a config of the family), then the family's fixed settings; the one place
    a run's ``model_config`` is checked (:class:`~ood_audit.config.RunConfig` calls it)."""
    spec = get_spec(name)
    if name in LOAD_ONLY:
        raise UserError(f"model {name!r} is not trained by ood-audit: it is what ood-audit import "
                        f"python makes; train one of: {', '.join(trainable_specs())}")
    if preset not in spec.presets:
        raise UserError(
            f"model {name!r} has no preset {preset!r}; choose one of: {', '.join(spec.presets)}"
        )
    if dataclasses.is_dataclass(config):
        if not isinstance(config, spec.config_cls):
            raise UserError(f"model_config is a {type(config).__name__}; model {name!r} takes a "
                            f"{spec.config_cls.__name__}")
        overrides = config_dict(config)
    else:
        overrides = dict(config or {})
    clash = sorted(k for k in overrides if k in spec.fixed and overrides[k] != spec.fixed[k])
    if clash:
        raise UserError(
            f"model {name!r} fixes {', '.join(f'{k}={spec.fixed[k]!r}' for k in clash)}; "
            "drop it from model_config or pick the other model family"
        )
    merged = {**spec.presets[preset], **overrides, **spec.fixed}
    return from_dict(spec.config_cls, merged, where=f"model_config of {name}")


def resolve_model_config(
    name: str, preset: str, overrides: Any, input_shape: tuple[int, int, int]
) -> tuple[Any, list[str]]:
    """The full config of model ``name`` (:func:`model_settings`), fitted to the input
    shape. Returns the config and notes to print."""
    config, note = get_spec(name).fit(model_settings(name, preset, overrides), input_shape)
    return config, [note] if note else []


def build_model(name: str, config: Any, input_shape: tuple[int, int, int]) -> DensityModel:
    """Instantiate model ``name`` from a resolved config."""
    return get_spec(name).build(config, tuple(input_shape))


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
