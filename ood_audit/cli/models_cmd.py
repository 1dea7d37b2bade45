"""``ood-audit models``: the model families, with their presets and the terms they write."""

from __future__ import annotations

from . import render


def models() -> None:
    """List every model family: built-in, registered by an installed package (the
    entry-point group ood_audit.models), or made by ood-audit import python; with its
    summary, presets and the terms its scores hold (they sum to log p(x)).

    A plugin is a package whose metadata names a ModelSpec in the group ood_audit.models,
    e.g. in its pyproject.toml: [project.entry-points."ood_audit.models"] gauss =
    "my_package.models:GAUSS_SPEC". It then trains with ood-audit train --model gauss. A
    plugin that fails to load is listed with the reason.
    """
    from ..commands.models import list_models  # the library: torch, for the work

    render.models_listed(list_models())
