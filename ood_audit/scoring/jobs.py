"""What ``score`` scores: the in-distribution splits and the OOD sets, as jobs.

A :class:`ScoreJob` is one set with its role (``in`` / ``ood``), its transform tag and
the position of its first image in the data set. Transforms (``score --transform``,
:mod:`ood_audit.data.transforms`) add, per transform, a copy of the in-distribution test
set and of every OOD set with the transform applied to their uint8 pixels; these rows
keep their role and carry the transform's tag in the ``transform`` column (``none`` for
the untransformed sets, which are always scored).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CheckpointInfo
from ..data.adapt import adapt_to_shape
from ..data.images import ImageSet
from ..data.registry import load_dataset
from ..data.transforms import describe, parse_transforms
from ..errors import UserError
from .schema import TRANSFORMS_KEY


@dataclass
class ScoreJob:
    """One data set to score, with its role and tags."""

    images: ImageSet
    role: str  # "in" | "ood"
    transform: str = "none"
    first_index: int = 0  # position of images[0] in its data set (held-out train rows)

    @property
    def key(self) -> int:
        """A stable integer naming (set, split, transform) for seeding its noise."""
        tag = f"{self.images.name}|{self.images.split}|{self.transform}"
        return zlib.crc32(tag.encode())


def build_jobs(info: CheckpointInfo, ood: list[str], *, root: Path | None, download: bool,
               limit: int | None, train_limit: int | None, seed: int,
               notify=print, held_out: bool = False,
               transforms: list[str] | tuple[str, ...] = ()) -> list[ScoreJob]:
    """Load the in-distribution test (and train) split and each OOD set, shape-adapted.

    ``held_out``: the train rows are the ``train_limit`` train images after the first
    ``train.limit`` ones the model was trained on (its ``--limit``), not the first ones.
    ``transforms``: tags such as ``grayscale`` or ``contrast=0.5``; each adds a
    transformed copy of the in-distribution test set and of every OOD set (after their
    shape adaptation), after all untransformed jobs, tagged with the canonical tag.
    """
    parsed = parse_transforms(list(transforms))  # a bad tag fails before any loading
    in_name = info.dataset
    seen = set()
    for name in ood:
        if name == in_name:
            raise UserError(f"--ood {name} is the model's own training set; name another set")
        if name in seen:
            raise UserError(f"--ood {name} is given twice")
        seen.add(name)
    jobs = [ScoreJob(load_dataset(in_name, "test", root=root, download=download,
                                  limit=limit), "in")]
    if held_out:
        jobs.append(held_out_job(info, train_limit, root=root, download=download))
    elif train_limit != 0:
        jobs.append(ScoreJob(load_dataset(in_name, "train", root=root, download=download,
                                          limit=train_limit), "in"))
    for name in ood:
        images = load_dataset(name, "test", root=root, download=download, limit=limit,
                              shape=info.input_shape, seed=seed)
        adapted = adapt_to_shape(images, info.input_shape)
        if adapted.adaptation:
            notify(f"{name}: {adapted.adaptation} to fit the model's input "
                   f"{'x'.join(map(str, info.input_shape))}")
        jobs.append(ScoreJob(adapted, "ood"))
    for job in jobs:
        if len(job.images) == 0:
            raise UserError(f"data set {job.images.name} ({job.images.split}) has no images")
    if parsed:
        bases = [jobs[0], *(j for j in jobs if j.role == "ood")]  # in-dist. test, OOD sets
        for t in parsed:
            jobs += [ScoreJob(t(j.images), j.role, transform=t.tag) for j in bases]
        notify(f"transforms {', '.join(t.tag for t in parsed)}: each applied to "
               f"{', '.join(j.images.name for j in bases)} (uint8 pixels, before dequantization)")
    return jobs


def held_out_job(info: CheckpointInfo, train_limit: int | None, *, root: Path | None,
                 download: bool) -> ScoreJob:
    """Train images the model never saw: those after the first ``train.limit``."""
    trained_on = (info.run_config.get("train") or {}).get("limit")
    if not trained_on:
        raise UserError("--held-out needs a run trained with --limit N (the train images "
                        "after the first N are held out); this run trained on the whole set")
    if train_limit == 0:
        raise UserError("--held-out scores held-out train images: give --train-limit N > 0")
    end = None if train_limit is None else trained_on + train_limit
    images = load_dataset(info.dataset, "train", root=root, download=download, limit=end)
    if len(images) <= trained_on:
        raise UserError(f"{info.dataset} has {len(images)} train images, all used for "
                        f"training (--limit {trained_on}): nothing is held out")
    rest = dataclasses.replace(images, images=images.images[trained_on:].clone(),
                               labels=images.labels[trained_on:].clone())
    return ScoreJob(rest, "in", first_index=trained_on)


def set_key(job: ScoreJob) -> list[str]:
    return [job.images.name, job.role, job.images.split, job.transform]


def transforms_meta(jobs: list[ScoreJob]) -> dict[str, str]:
    """``{"transforms": JSON {tag: what it does}}`` when any job is transformed."""
    tags = list(dict.fromkeys(j.transform for j in jobs if j.transform != "none"))
    return {TRANSFORMS_KEY: json.dumps({t: describe(t) for t in tags})} if tags else {}
