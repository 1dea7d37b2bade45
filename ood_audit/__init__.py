"""ood-audit: audit deep generative models as out-of-distribution detectors.

Reproduces Nalisnick et al., "Do Deep Generative Models Know What They Don't Know?"
(ICLR 2019) on any model and data set.

In Python: ``from ood_audit import audit`` (docs/python-api.md). Importing the package
stays light; ``audit`` loads torch when called.
"""

from __future__ import annotations

__version__ = "0.2.0"


def audit(model_or_run, in_data=None, ood=(), detectors=None, limit=None, **options):
    """Audit a density model as an OOD detector: score its training distribution's test
    images and each OOD set, as ``ood-audit score`` does, and return an
    :class:`~ood_audit.api.result.AuditResult` (``.scores``, ``.metrics``,
    ``.decomposition()``, ``.report(path)``).

    ``model_or_run``: a run directory (``ood-audit train``'s, or an imported one), scored
    in place; a ``DensityModel``; or any ``torch.nn.Module`` with ``log_prob(x) -> [B]``,
    including normflows, nflows and zuko flows (their adapters write log p(z) and the
    log|det| per transform).
    ``in_data``: the set the model was trained on (None for a run: its own). ``ood``: the
    OOD sets. Each set is a registry name (``"mnist"``), a path (``.npy``/``.npz``, a
    folder of images), a uint8 array/tensor ``[N, H, W]``, ``[N, H, W, C]`` or
    ``[N, C, H, W]``, or a ``(label, array)`` pair.
    ``detectors``: names (None: every detector whose needs are met). ``limit``: the first
    N images of each set.

    Keywords: ``out`` (keep a module's run directory there; default a temporary folder
    deleted with the result), ``input_range`` (``"0,1"``, ``"-0.5,0.5"``, ``"-1,1"``,
    ``"0,255"``: what a plain module takes; the change of variables is added) and
    ``discrete`` (``log_prob`` takes uint8 pixels and gives log P(k)); ``data_root``,
    ``download``, ``notify`` (where notes go; default ``print``); and ``score``'s options
    (``train_limit``, ``batch_size``, ``seed``, ``device``, ``transforms``, ``members``,
    ``held_out``, ``workers``, ...). Errors a user can fix raise
    :class:`~ood_audit.errors.UserError` with one line saying what to do.
    """
    from .api.audit import audit as run_audit  # torch and pandas load here, not at import

    return run_audit(model_or_run, in_data, ood, detectors, limit, **options)


def __getattr__(name: str):
    if name == "AuditResult":
        from .api.result import AuditResult

        return AuditResult
    raise AttributeError(f"module 'ood_audit' has no attribute {name!r}")
