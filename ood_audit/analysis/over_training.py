"""log p(z) and log|det| per epoch: rescoring a fixed subset with every epoch checkpoint.

The paper (Nalisnick et al. 2019, section 4) follows both terms over training for the
in-distribution and OOD test sets and finds the OOD advantage present throughout. The
same images and the same dequantization noise are used for every epoch, so the curves
differ only by the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..checkpoint import load_checkpoint
from ..config import DecomposeConfig, ScoreConfig
from ..device import pick_device
from ..errors import UserError
from ..runs import RunDir, atomic_path
from ..scoring.batches import model_columns, score_images
from ..scoring.jobs import build_jobs
from ..scoring.schema import totals_for
from ..scoring.scorer import ScoreProgress


def over_training(rd: RunDir, ood: list[str], *, limit: int = DecomposeConfig.over_training_limit,
                  root: Path | None = None, download: bool = False,
                  batch_size: int = ScoreConfig.batch_size, device: str = "auto",
                  seed: int = 0, progress: ScoreProgress | None = None) -> pd.DataFrame:
    """Tidy table: one row per (epoch, data set, term) with the term's mean over the subset.

    Terms are ``log_px``, ``bpd`` and the model's group totals (``log_pz``, ``logdet`` for
    a flow). Written to ``rd.over_training``.
    """
    checkpoints = rd.epoch_checkpoints()
    if not checkpoints:
        raise UserError(f"{rd.root} keeps no per-epoch checkpoints (checkpoints/epoch-*.safetensors):"
                        " train with --keep-checkpoints all to follow terms over training")
    if limit <= 0:
        raise UserError(f"--over-training-limit must be positive, got {limit}")
    dev = pick_device(device)
    progress = progress or ScoreProgress()
    _, first = load_checkpoint(checkpoints[0], dev)
    jobs = build_jobs(first, ood, root=root, download=download, limit=limit, train_limit=0,
                      seed=seed, notify=lambda message: None)
    rows = []
    for path in checkpoints:
        model, info = load_checkpoint(path, dev)
        terms, _ = model_columns(model, dev)
        groups = totals_for(terms)
        for job in jobs:
            progress.set_start(job, len(job.images))
            sums: dict[str, float] = {}
            for cols in score_images(model, job, batch_size, dev, seed):
                for total, members in groups.items():
                    cols[total] = np.sum([cols[m] for m in members], axis=0)
                for key in ("log_px", "bpd", *groups):
                    sums[key] = sums.get(key, 0.0) + float(np.sum(cols[key]))
                progress.advance(len(cols["log_px"]), 0.0)
            for term, total in sums.items():
                rows.append(dict(epoch=info.epoch, dataset=job.images.name, role=job.role,
                                 split=job.images.split, term=term,
                                 mean=total / len(job.images), n=len(job.images)))
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    with atomic_path(rd.over_training) as tmp:
        table.to_parquet(tmp, index=False)
    return table


def wide(table: pd.DataFrame, terms: tuple[str, ...] = ("log_pz", "logdet", "bpd")) -> pd.DataFrame:
    """Epoch rows, (data set, term) columns: the shape of the paper's plots as a table."""
    sub = table[table["term"].isin(terms)]
    return sub.pivot_table(index="epoch", columns=["dataset", "term"], values="mean").sort_index()
