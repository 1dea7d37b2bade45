"""ImageSet: the one in-memory form every data source is turned into.

Registry sets, synthetic sets and user files all load into an :class:`ImageSet`:
raw pixels as ``uint8 [N, C, H, W]`` (values 0..255, never normalised here) plus
``int64 [N]`` labels (-1 where a source has none). Dequantization to [0, 1) happens
later, once, in :mod:`ood_audit.data.preprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class ImageSet:
    """Images of one data set and split, with the shape rule applied to them, if any."""

    name: str  # registry name, or the user's path as given
    split: str  # "train" | "test"
    images: torch.Tensor  # uint8 [N, C, H, W], contiguous
    labels: torch.Tensor  # int64 [N]; -1 where unlabeled
    adaptation: str | None = None  # one line: the shape rule applied (see adapt.py)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"ImageSet {self.name!r}: images must be uint8 [N, C, H, W], "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (len(self),):
            raise ValueError(
                f"ImageSet {self.name!r}: labels must be int64 [{len(self)}], "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def head(self, n: int) -> ImageSet:
        """The first ``n`` images (all of them when ``n >= len(self)``), copied."""
        if n >= len(self):
            return self
        return replace(self, images=self.images[:n].clone(), labels=self.labels[:n].clone())
