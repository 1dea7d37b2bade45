"""Model families from other packages: the entry-point group ``ood_audit.models``.

A package registers a family by naming a :class:`~.registry.ModelSpec` (config class,
presets, build) in its metadata, e.g. in its ``pyproject.toml``::

    [project.entry-points."ood_audit.models"]
    gauss = "my_package.models:GAUSS_SPEC"

The entry point's name is the family's name (``ood-audit train --model gauss``) and must
equal the spec's ``name``. :func:`plugin_names` lists the families by name without
importing anything (``--help`` stays torch-free); :func:`load_plugins` imports them
when a command needs one. A plugin that fails to load, names a built-in family or is not
a ModelSpec is left out, and the reason kept for ``ood-audit models`` and for the
one-line error of a command that names it.

Torch-free itself: only :mod:`importlib.metadata`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

GROUP = "ood_audit.models"


@dataclass(frozen=True)
class PluginEntry:
    """One registered family, as its metadata names it (nothing imported)."""

    name: str
    value: str  # "module:attribute"
    dist: str  # the distribution that registers it


def plugin_entries() -> list[PluginEntry]:
    """The entry points of :data:`GROUP` on ``sys.path`` now, first of each name."""
    seen: dict[str, PluginEntry] = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        seen.setdefault(ep.name, PluginEntry(ep.name, ep.value, dist))
    return list(seen.values())


def plugin_names() -> dict[str, str]:
    """Family name -> the distribution registering it; nothing is imported."""
    return {e.name: e.dist for e in plugin_entries()}


#: (name, value, dist) -> the loaded spec, or the reason it could not be loaded.
_LOADED: dict[tuple[str, str, str], Any] = {}


def load_plugins(is_spec: type, builtin: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """({name: spec} of the plugins that load, {name: why not} of those that do not).

    ``is_spec``: the ModelSpec class a plugin's object must be (or a callable return);
    ``builtin``: names a plugin may not take. Each entry point is imported once.
    """
    specs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for entry in plugin_entries():
        key = (entry.name, entry.value, entry.dist)
        if key not in _LOADED:
            _LOADED[key] = _load(entry, is_spec, builtin)
        loaded = _LOADED[key]
        if isinstance(loaded, str):
            errors[entry.name] = loaded
        else:
            specs[entry.name] = loaded
    return specs, errors


def _load(entry: PluginEntry, is_spec: type, builtin: set[str]) -> Any:
    where = f"plugin {entry.name!r} ({entry.value}, from {entry.dist})"
    if entry.name in builtin:
        return f"{where} takes the name of a built-in family; the built-in one is used"
    try:
        obj = metadata.EntryPoint(entry.name, entry.value, GROUP).load()
        if not isinstance(obj, is_spec) and callable(obj):
            obj = obj()
    except Exception as exc:  # noqa: BLE001 - another package's bug: kept as its reason
        text = str(exc).strip().splitlines()
        return f"{where} failed to load: {type(exc).__name__}: {text[0] if text else ''}"
    if not isinstance(obj, is_spec):
        return f"{where} is a {type(obj).__name__}, not an ood_audit ModelSpec"
    if obj.name != entry.name:
        return f"{where} holds a spec named {obj.name!r}; the entry point must have the same name"
    return obj
