"""The Python API for notebooks and scripts: :func:`ood_audit.audit` and what it returns.

- :mod:`.audit`: ``audit()``, scoring through the same library call as ``ood-audit score``;
- :mod:`.result`: :class:`~.result.AuditResult`, read through the library calls of
  ``decompose`` and ``report``;
- :mod:`.data`: names, paths and arrays as the sets the scorer loads;
- :mod:`.wrap`: a plain ``torch.nn.Module`` (or a normflows / nflows / zuko flow) as a
  density model, with issue 14's input-range and discrete rules.

Importing this package is light; its modules import torch. docs/python-api.md has a
worked example.
"""
