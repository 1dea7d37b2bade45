"""The data the Python API takes, as names ``load_dataset`` finds.

A set is a registry name (``"mnist"``), a path (a ``.npy``/``.npz`` file or a folder of
images, :mod:`ood_audit.data.user_files`), a uint8 array or tensor, or a
``(label, array)`` pair. Arrays become :class:`~ood_audit.data.images.ImageSet` objects
held in memory under their label (:func:`ood_audit.data.registry.in_memory_sets`), so
the scorer loads them by name like any other set; the label is their ``dataset`` column
and seeds their dequantization noise, so the same array under the same label scores
the same. Unlabelled arrays are ``in-array`` (the in-distribution set) and
``ood-array{i}`` (position i in ``ood``).

Arrays: ``[N, H, W]`` (gray), ``[N, H, W, C]`` or ``[N, C, H, W]`` with C in {1, 3};
the channel axis is the one of axes 1 and 3 that holds 1 or 3 (when both do, a torch
tensor is read as ``[N, C, H, W]``, a numpy array as ``[N, H, W, C]``). Like a user's
file, an array has no splits: its images are both the test and the train rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.images import ImageSet
from ..data.registry import DATASETS, load_dataset
from ..errors import UserError

IN_LABEL = "in-array"
OOD_LABEL = "ood-array{i}"


@dataclass
class DataPlan:
    """The sets of one audit: names for ``ScoreConfig``, and the arrays held under them."""

    in_name: str | None
    ood_names: list[str]
    held: dict[str, ImageSet] = field(default_factory=dict)

    def in_shape(self, data_root=None) -> tuple[int, int, int]:
        """(C, H, W) of the in-distribution images (what a wrapped module is built for)."""
        if self.in_name in self.held:
            return self.held[self.in_name].shape
        spec = DATASETS.get(self.in_name or "")
        if spec is not None:
            if spec.shape is None:
                raise UserError(f"{self.in_name} is synthetic (it takes the model's shape), "
                                "so it cannot be the training set; name the set the model was "
                                "trained on")
            return spec.shape
        return load_dataset(str(self.in_name), "test", root=data_root, limit=1).shape


def plan_data(in_data, ood) -> DataPlan:
    """Names for ``in_data`` (None: the run's own set) and every entry of ``ood``."""
    if isinstance(ood, (str, os.PathLike)) or _is_array(ood) or _is_pair(ood):
        ood = [ood]
    plan = DataPlan(None, [])
    if in_data is not None:
        plan.in_name = _add(plan, in_data, IN_LABEL)
    for i, item in enumerate(ood):
        plan.ood_names.append(_add(plan, item, OOD_LABEL.format(i=i)))
    return plan


def _add(plan: DataPlan, item, label: str) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if _is_pair(item):
        label, item = item
    if not _is_array(item):
        raise UserError(f"data: expected a data set name, a path, a uint8 array or tensor, or "
                        f"a (label, array) pair; got {type(item).__name__}")
    if label in plan.held or label in DATASETS:
        raise UserError(f"data label {label!r} is used twice or names a registered data set; "
                        "give each array its own label: (label, array)")
    plan.held[label] = as_image_set(item, label)
    return label


def _is_array(item) -> bool:
    return isinstance(item, (np.ndarray, torch.Tensor))


def _is_pair(item) -> bool:
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and _is_array(item[1]))


def as_image_set(array, label: str) -> ImageSet:
    """A uint8 array or tensor of images as an ImageSet ``[N, C, H, W]`` (labels -1)."""
    is_tensor = isinstance(array, torch.Tensor)
    dtype_ok = array.dtype == (torch.uint8 if is_tensor else np.uint8)
    if not dtype_ok:
        raise UserError(f"{label}: pixels must be uint8 0..255, got {array.dtype}; e.g. "
                        "(x * 255).round().astype(numpy.uint8) for floats in [0, 1]")
    x = array.detach().cpu() if is_tensor else torch.from_numpy(np.ascontiguousarray(array))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if not first and not last:
            raise UserError(f"{label}: shape {tuple(x.shape)} has no channel axis of 1 or 3 "
                            "(expected [N, H, W], [N, H, W, C] or [N, C, H, W])")
        if last and not (first and is_tensor):
            x = x.permute(0, 3, 1, 2)
    else:
        raise UserError(f"{label}: shape {tuple(x.shape)}: expected [N, H, W], [N, H, W, C] "
                        "or [N, C, H, W] images")
    if x.shape[0] == 0:
        raise UserError(f"{label} holds no images")
    labels = torch.full((x.shape[0],), -1, dtype=torch.int64)
    return ImageSet(label, "test", x.contiguous(), labels)
