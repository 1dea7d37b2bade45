"""``ood-audit models`` as one library call: every model family, built-in, from a plugin
(the entry-point group ``ood_audit.models``, :mod:`ood_audit.models.plugins`) or made by
``ood-audit import``, with its summary, presets and the terms its scores hold."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..models.plugins import plugin_names
from ..models.registry import LOAD_ONLY, MODELS, ModelSpec, model_settings, plugin_specs

#: Image shapes a family's smallest preset is built for to read its terms off, in turn.
PROBE_SHAPES = ((1, 28, 28), (3, 32, 32))


@dataclass
class FamilyRow:
    name: str
    summary: str
    presets: list[str]
    terms: str
    origin: str  # built-in | plugin (<distribution>) | ood-audit import python
    error: bool = False  # a plugin that did not load (``summary`` says why)


def list_models() -> list[FamilyRow]:
    """The built-in families, then the plugins' (those that fail to load, with why), then
    the families made by ``ood-audit import``."""
    rows = [_row(spec, "built-in") for spec in MODELS.values()]
    specs, errors = plugin_specs()
    dists = plugin_names()
    for name in dists:
        if name in specs:
            rows.append(_row(specs[name], f"plugin ({dists[name]})"))
        elif name in errors:
            rows.append(FamilyRow(name, errors[name], [], "-", f"plugin ({dists[name]})", True))
    rows += [_row(spec, "ood-audit import python") for spec in LOAD_ONLY.values()]
    return rows


def _row(spec: ModelSpec, origin: str) -> FamilyRow:
    return FamilyRow(spec.name, spec.summary, list(spec.presets), spec.terms or probe_terms(spec),
                     origin)


@torch.no_grad()
def probe_terms(spec: ModelSpec) -> str:
    """The terms (and extra columns) a family writes, read off a model of its smallest
    preset on a small image, level and channel numbers written ``{i}``."""
    preset = "tiny" if "tiny" in spec.presets else next(iter(spec.presets), None)
    if preset is None:
        return "-"
    failure = ""
    for shape in PROBE_SHAPES:
        try:
            config, _ = spec.fit(model_settings(spec.name, preset), shape)
            model = spec.build(config, shape).eval()
            noise = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
            model.data_init(0.25 + 0.5 * noise)
            terms, extras = model.score_columns(torch.full((2, *shape), 0.5))
        except Exception as exc:  # noqa: BLE001 - a plugin's model: say why, list the rest
            failure = f"(not read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            continue
        names = _patterns(terms) + [f"extra {n}" for n in _patterns(extras)]
        return ", ".join(names)
    return failure


def _patterns(names) -> list[str]:
    """``log_pz_level0, log_pz_level1`` -> ``log_pz_level{i}``, order kept."""
    return list(dict.fromkeys(re.sub(r"\d+", "{i}", n) for n in names))
