"""Pixel transforms for the paper's variance experiments (``ood-audit score --transform``).

Nalisnick et al. (2019), section 5 and docs/paper.md point 5: the data set with the
smaller per-channel variance gets the higher likelihood, so graying an image (which lowers
its variance) raises its likelihood, and a contrast sweep x -> mean + alpha (x - mean)
is the same experiment with a dial: the second-order analysis predicts mean bits/dim
to fall monotonically as alpha (and the variance, by about alpha^2) shrinks.

Every transform maps ``uint8 [N, C, H, W]`` to ``uint8 [N, C, H, W]`` (same shape, same
dtype) and acts on raw pixels, before dequantization. It is applied to images already
fitted to the model's shape (:mod:`ood_audit.data.adapt`: gray<->RGB, resize, the
"shape adaptations"), so its output always fits the model.

- ``grayscale``: ITU-R BT.601 luminance Y = 0.299 R + 0.587 G + 0.114 B, rounded and
  replicated to every channel (R = G = B = Y). The identity on 1-channel images.
- ``contrast=ALPHA``: y = m + ALPHA (x - m), **m = the image's own mean over all its
  pixels and channels** (one number per image, as torchvision's ``adjust_contrast`` and
  Pillow's ``ImageEnhance.Contrast`` use one mean per image). Per image rather than per
  channel, so ALPHA -> 0 gives a flat gray image and the colours' spread around the mean
  shrinks too; per image rather than over the data set, so an image's result never
  depends on which other images are loaded. ALPHA >= 0; ALPHA < 1 lowers the variance
  (by ALPHA^2 within each image), ALPHA > 1 raises it. Results are rounded (half to even)
  and **clipped to 0..255**, so for ALPHA > 1 the saturated pixels keep the variance
  below ALPHA^2 times the original, and for small ALPHA rounding to integers adds a
  little. ``contrast=1`` is the identity.
- ``invert``: 255 - x (a negative image: same variance, mirrored mean).

:data:`TRANSFORMS` is the one registry; the CLI builds its help from it. A transform is
named by its tag, ``NAME`` or ``NAME=ARG`` (``grayscale``, ``contrast=0.5``): the value
of the scores' ``transform`` column, canonical so that ``contrast=0.50`` and
``contrast=.5`` are the same tag (the dequantization noise is seeded by it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # the transforms work through tensor methods: this registry (and
    import torch  # --help, which lists it) loads without torch

    from .images import ImageSet

LUMA_BT601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights of R, G, B
CHUNK = 1024  # images per chunk

NONE = "none"  # the transform column of untransformed images


def _grayscale(x: torch.Tensor, _: float | None) -> torch.Tensor:
    """[B, C, H, W] uint8 -> same; luminance replicated to the C channels."""
    c = x.shape[1]
    if c == 1:
        return x
    if c != 3:
        raise UserError(f"grayscale needs 1- or 3-channel images, got {c} channels")
    f = x.float()
    weights = f.new_tensor(LUMA_BT601).view(1, 3, 1, 1)
    y = (f * weights).sum(dim=1, keepdim=True)
    return y.round_().clamp_(0, 255).byte().expand(-1, 3, -1, -1)


def _contrast(x: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """[B, C, H, W] uint8 -> same: m + alpha (x - m), m the per-image mean."""
    assert alpha is not None
    f = x.float()  # rounding errors ~1e-5: contrast=1 gives back x exactly
    m = f.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    return (m + alpha * (f - m)).round_().clamp_(0, 255).byte()


def _invert(x: torch.Tensor, _: float | None) -> torch.Tensor:
    return 255 - x


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(f"contrast={text}: ALPHA must be a number >= 0 (e.g. contrast=0.5; "
                        f"below 1 lowers the variance, 1 is the identity)")
    return value


@dataclass(frozen=True)
class TransformSpec:
    """One registered transform."""

    name: str
    summary: str  # one line, shown in --help
    arg: str | None  # the argument's name in NAME=ARG (e.g. "ALPHA"); None: takes none
    fn: Callable[[torch.Tensor, float | None], torch.Tensor]  # uint8 [B,C,H,W] -> same
    parse_arg: Callable[[str], float] | None = None

    @property
    def usage(self) -> str:
        return self.name if self.arg is None else f"{self.name}={self.arg}"


TRANSFORMS: dict[str, TransformSpec] = {
    spec.name: spec
    for spec in (
        TransformSpec("grayscale", "BT.601 luminance replicated to the model's channels "
                      "(the paper's graying; identity on gray images)", None, _grayscale),
        TransformSpec("contrast", "x -> m + ALPHA (x - m), m = the image's mean over all "
                      "pixels and channels; rounded, clipped to 0..255 (a variance sweep)",
                      "ALPHA", _contrast, _alpha),
        TransformSpec("invert", "255 - x (negative image)", None, _invert),
    )
}


@dataclass(frozen=True)
class Transform:
    """A transform with its argument, e.g. ``contrast=0.5``."""

    spec: TransformSpec
    arg: float | None = None

    @property
    def tag(self) -> str:
        """The canonical ``NAME`` or ``NAME=ARG``: the scores' ``transform`` value."""
        if self.arg is None:
            return self.spec.name
        text = repr(float(self.arg))  # shortest text that reads back as the same float
        return f"{self.spec.name}={text.removesuffix('.0')}"

    def __call__(self, images: ImageSet) -> ImageSet:
        """``images`` transformed (a new ImageSet; name, split, labels, adaptation kept)."""
        out = images.images.new_empty(images.images.shape)
        for start in range(0, len(images), CHUNK):
            out[start:start + CHUNK] = self.spec.fn(images.images[start:start + CHUNK],
                                                    self.arg)
        return replace(images, images=out)


def parse_transform(text: str) -> Transform:
    """``"grayscale"``, ``"contrast=0.5"``, ``"invert"`` -> :class:`Transform`; UserError
    naming the choices for anything else."""
    raw = str(text).strip()
    name, sep, arg = raw.partition("=")
    name = name.strip().lower()
    spec = TRANSFORMS.get(name)
    if spec is None:
        raise UserError(f"unknown transform {raw!r}; choose one of "
                        f"{', '.join(s.usage for s in TRANSFORMS.values())}")
    if spec.arg is None:
        if sep:
            raise UserError(f"transform {name} takes no argument; write --transform {name}")
        return Transform(spec)
    if not sep or not arg.strip():
        raise UserError(f"transform {name} needs an argument: --transform {spec.usage} "
                        f"(e.g. {name}=0.5)")
    assert spec.parse_arg is not None
    return Transform(spec, spec.parse_arg(arg.strip()))


def parse_transforms(texts: list[str] | tuple[str, ...]) -> list[Transform]:
    """Parse several; UserError when two name the same canonical tag."""
    out: list[Transform] = []
    for text in texts:
        t = parse_transform(text)
        if any(o.tag == t.tag for o in out):
            raise UserError(f"--transform {t.tag} is given twice")
        out.append(t)
    return out


def contrast_factor(tag: str) -> float | None:
    """ALPHA of a ``contrast=ALPHA`` tag, 1.0 for untransformed (``none``), else None."""
    if tag in (NONE, "", None):
        return 1.0
    name, sep, arg = str(tag).partition("=")
    if name != "contrast" or not sep:
        return None
    try:
        return float(arg)
    except ValueError:
        return None


def describe(tag: str) -> str:
    """One line saying what a tag does, for the scores' metadata."""
    try:
        t = parse_transform(tag)
    except UserError:
        return "unknown transform"
    if t.spec.name == "contrast":
        return f"x -> m + {t.tag.partition('=')[2]} (x - m), m = per-image mean; rounded, " \
               "clipped to 0..255"
    return t.spec.summary
