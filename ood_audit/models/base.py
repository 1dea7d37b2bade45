"""The one interface every density model implements.

A model is a density over images x in [0, 1)^D after uniform dequantization
(x = (k + u) / 256, see ``ood_audit.data.preprocess``), shape ``[B, C, H, W]``.
It hands back *named per-sample terms* whose sum is log p(x) in nats, so the scorer can
write each term as a Parquet column and the decomposition needs no special cases.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError


class DensityModel(nn.Module):
    """Base class. Subclasses set ``input_shape`` and implement ``log_prob_terms``."""

    #: (C, H, W) of the images the model takes.
    input_shape: tuple[int, int, int]

    def log_prob_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Named per-sample terms, each shape ``[B]``; their sum is log p(x) in nats."""
        raise NotImplementedError  # abstract: every registered model overrides it

    def score_columns(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """What the scorer writes per image: (terms that sum to log p(x), extra columns).

        Extra columns (each ``[B]``) describe an image without being part of the sum,
        e.g. PixelCNN++'s per-row log-likelihood summary. Default: no extras.
        """
        return self.log_prob_terms(x), {}

    def set_score_option(self, name: str, value: object) -> None:
        """Set a scoring-time option (a VAE's ``iw_samples``); unknown options are errors."""
        raise UserError(f"{type(self).__name__} has no scoring option {name!r}")

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats, shape ``[B]``: the sum of :meth:`log_prob_terms`."""
        return sum_terms(self.log_prob_terms(x))

    def training_loss(self, x: Tensor) -> Tensor:
        """Per-sample loss in nats, shape ``[B]``, that training minimises.

        Defaults to -log p(x); a model whose training objective differs from its scored
        log-likelihood (a VAE trains on the ELBO, scores the IWAE bound) overrides it.
        """
        return -self.log_prob(x)

    def activation_memory_format(self) -> torch.memory_format:
        """The memory format of the 4-D activations this model convolves where its
        parameters are. DDP lays the convolution kernels out in it, so their gradients
        arrive in the layout of its buckets (:mod:`~ood_audit.training.layout`). NCHW by
        default."""
        return torch.contiguous_format

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """Data-dependent initialisation on a first batch (ActNorm); a no-op by default."""

    def extra_metadata(self) -> dict[str, str]:
        """Per-model facts recorded in checkpoints and Parquet metadata."""
        return {}


class ImportanceWeighted(DensityModel):
    """A latent-variable model scored by a K-sample importance-weighted bound (the VAE,
    the hierarchical VAE): K is its one scoring option, ``iw_samples``."""

    iw_samples: int

    def set_score_option(self, name: str, value: object) -> None:
        """``iw_samples``: K of the importance-weighted bound(s) (a positive int)."""
        if name != "iw_samples":
            super().set_score_option(name, value)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"iw_samples must be a positive integer, got {value!r}")
        self.iw_samples = value


def sum_terms(terms: dict[str, Tensor]) -> Tensor:
    """Sum named ``[B]`` terms into log p(x); the one place the sum is written."""
    values = list(terms.values())
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total
