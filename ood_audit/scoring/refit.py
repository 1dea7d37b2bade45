"""Likelihood regret in the batch loop: the per-image re-fit of a VAE's encoder, as a
:class:`~ood_audit.scoring.companions.Computation` (its provider is in companions)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from ..models.base import DensityModel
from ..models.regret import RefitSettings, likelihood_regret
from .schema import REGRET_COLUMN

#: ScoresMeta.extra key: JSON of the re-fit's settings (steps, lr, weight decay, K).
REGRET_KEY = "likelihood_regret"


@dataclasses.dataclass
class RegretComputation:
    """``likelihood_regret`` per image (nats): the run's model, re-fit image by image
    (every image of a batch at once, each with its own encoder copy). Its draws are seeded
    by the image's index, so a value does not depend on the batch size."""

    model: DensityModel
    settings: RefitSettings = RefitSettings()
    columns: list[str] = dataclasses.field(default_factory=lambda: [REGRET_COLUMN])

    def __call__(self, cols: dict[str, np.ndarray], x: torch.Tensor,
                 images: torch.Tensor) -> dict[str, np.ndarray]:
        seeds = [int(i) for i in cols["index"]]
        regret = likelihood_regret(self.model, x, seeds, self.settings)
        return {REGRET_COLUMN: regret.double().cpu().numpy()}

    def metadata(self) -> dict[str, str]:
        return {REGRET_KEY: json.dumps(dataclasses.asdict(self.settings))}
