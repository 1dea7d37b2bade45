"""What an experiment reports while it runs: the CLI implements these; the defaults
stay silent. Light, so the CLI's ``run`` command loads without the library."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import Step


class ExperimentHooks:
    """What the CLI shows while an experiment runs; the defaults stay silent."""

    def log(self, message: str) -> None:
        """A one-line notice."""

    def step_start(self, step: Step, index: int, total: int, action: str) -> None:
        """Step ``index`` (1-based) of ``total`` starts; ``action`` says how (resume...)."""

    def step_skip(self, step: Step, index: int, total: int, why: str) -> None:
        """Step ``index`` is complete already and is skipped."""

    def step_end(self, step: Step, seconds: float, result: object) -> None:
        """A step finished; ``result`` is what its library call returned."""

    def train_progress(self):
        """A :class:`~ood_audit.training.trainer.TrainProgress` for a train step, or None."""
        return None

    def score_progress(self):
        """A context manager yielding a ScoreProgress (or None) for score/over-training."""
        return contextlib.nullcontext(None)
