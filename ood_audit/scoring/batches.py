"""The batch loop: one job's images, dequantized, through the model, as columns.

The scorer never special-cases a model family: it writes whatever named terms the
model's ``score_columns`` returns, then ``log_px`` (their sum, in float64 so the written
terms add up to it exactly) and ``bpd``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..data.preprocess import bits_per_dim
from ..models.base import DensityModel, sum_terms
from ..seeds import seeded
from .batch_fit import ForwardSize
from .jobs import ScoreJob
from .loader import dequantized_batches
from .noise import Shard


def model_columns(model: DensityModel, device: torch.device) -> tuple[list[str], list[str]]:
    """The model's term names and extra column names, read off one tiny forward pass."""
    with torch.inference_mode():
        x = torch.full((1, *model.input_shape), 0.5, device=device)
        terms, extras = model.score_columns(x)
        return list(terms), list(extras)


@torch.inference_mode()
def score_images(model: DensityModel, job: ScoreJob, batch_size: int, device: torch.device,
                 seed: int, *, shard: Shard = Shard(), plan=None,
                 workers: int | None = None,
                 fit: ForwardSize | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield column dicts (numpy, one entry per image) for batches of ``job``'s images.

    ``plan`` (a :class:`~ood_audit.scoring.companions.InputPlan`): also score its
    companion models on the same x and add its data features, batch by batch.
    ``workers``: DataLoader processes dequantizing the next chunks
    (:func:`~ood_audit.scoring.loader.dequantized_batches`; None: 2 on CUDA, 0 on CPU);
    the numbers do not depend on it. ``fit``: the forward-pass size, shared by a
    command's sets, halved on CUDA out-of-memory (:mod:`.batch_fit`; None: a fresh one).
    """
    fit = fit or ForwardSize(batch_size)
    images = job.images.images
    seeded_chunk = None
    for c, start, x in dequantized_batches(images, shard.chunks(len(images)),
                                           batch_size=batch_size, seed=seed, key=job.key,
                                           device=device, workers=workers):
        if c != seeded_chunk:
            # Models that sample while scoring (a VAE's IWAE bound) draw from the global
            # RNG: seed it per chunk (apart from the noise's stream) so a rerun, or a run
            # with another number of processes or workers, gives the same numbers.
            torch.manual_seed(seeded(seed, job.key, c, 1).initial_seed())
            seeded_chunk = c
        yield fit.run(lambda xs, first: _batch_columns(model, job, xs, first, plan), x, start)


def _batch_columns(model: DensityModel, job: ScoreJob, x: torch.Tensor, start: int,
                   plan=None) -> dict[str, np.ndarray]:
    """The columns of images ``start ..`` of ``job`` (``x``: them, dequantized)."""
    # Sum in float64 so the written terms add up to the written log_px exactly.
    raw_terms, extras = model.score_columns(x)
    terms = {k: v.double() for k, v in raw_terms.items()}
    log_px = sum_terms(terms)
    cols: dict[str, np.ndarray] = {
        "log_px": log_px.cpu().numpy(),
        "bpd": bits_per_dim(log_px, math.prod(job.images.shape)).cpu().numpy(),
    }
    for name, value in {**terms, **extras}.items():
        cols[name] = value.double().cpu().numpy()
    idx = np.arange(start, start + len(x), dtype=np.int64)
    cols["index"] = idx + job.first_index
    cols["label"] = job.images.labels[idx].numpy()
    if plan is not None:
        plan.batch_columns(cols, x, job.images.images[start:start + len(x)])
    return cols
