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

from .hooks import ExperimentHooks
from .plan import plan, train_argv
from .runner import ExperimentResult, run_experiment, statuses
from .spec import STATE_FILE, STEPS, Experiment, Step, load_experiment, second_order_available

__all__ = ["STATE_FILE", "STEPS", "Experiment", "ExperimentHooks", "ExperimentResult", "Step",
           "load_experiment", "plan", "run_experiment", "second_order_available", "statuses",
           "train_argv"]
