"""One library call per CLI command: ``train``, ``score``, ``decompose``, ``report``.

Each takes the command's config dataclass (:mod:`ood_audit.config`) and owns what the
command means beyond the maths: validation, the run's lock, torchrun start-up, Ctrl-C,
and the summary it returns as data (the CLI prints it; ``ood-audit run`` records it).
The CLI (:mod:`ood_audit.cli`) and the experiment runner (:mod:`ood_audit.experiments`)
call these and nothing below them, so a command behaves the same from either.
"""
