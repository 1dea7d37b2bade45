"""Images the user brings: a ``.npy`` / ``.npz`` file or a folder of image files.

- ``.npy``: an integer array (N, H, W) or (N, H, W, C) with C in {1, 3}, values 0..255
  (uint8 ideal). Channels-last, as numpy/PIL write images.
- ``.npz``: the array under key ``images``, ``x`` or the only array; optional integer
  labels [N] under ``labels`` or ``y``.
- a folder: every ``.png .jpg .jpeg .bmp .gif .webp`` file directly in it (not in
  subfolders; hidden files skipped), sorted by name, decoded with Pillow (first frame,
  alpha dropped). All grayscale (modes 1, L, LA, gray palette) -> 1 channel, otherwise
  RGB; every image must have the same size.

User data has no splits: "test" and "train" both give the same images. Every problem
is a one-line :class:`~ood_audit.errors.UserError` naming the file.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .files import ARRAY_SUFFIXES, IMAGE_SUFFIXES
from .images import ImageSet

IMAGE_KEYS = ("images", "x")
LABEL_KEYS = ("labels", "y")
_GRAY_MODES = ("1", "L", "LA", "La")
_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def load_user_data(path: str, split: str = "test", limit: int | None = None) -> ImageSet:
    """Load a .npy/.npz file or a folder of images; ``name`` is ``path`` as given."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: no such file or folder; pass a .npy/.npz file or a folder "
                        f"of images")
    if p.is_dir():
        images, labels = _read_folder(p, path, limit)
    elif p.suffix.lower() in ARRAY_SUFFIXES:
        images, labels = _read_array_file(p, path, limit)
    else:
        raise UserError(f"{path}: unsupported file type {p.suffix or '(none)'!r}; pass a .npy or "
                        f".npz array or a folder of {'/'.join(IMAGE_SUFFIXES)} images")
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
    return ImageSet(name=str(path), split=split, images=images, labels=labels)


# --- .npy / .npz ---------------------------------------------------------------------


def _read_array_file(p: Path, shown: str, limit: int | None):
    labels = None
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, mmap_mode="r", allow_pickle=False)  # mmap: limit reads only a prefix
        else:
            with np.load(p, allow_pickle=False) as npz:
                key = _pick_key(npz.files, IMAGE_KEYS, shown, required=True)
                arr = npz[key]
                label_key = _pick_key([k for k in npz.files if k != key], LABEL_KEYS, shown)
                if label_key is not None:
                    labels = npz[label_key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{shown}: could not read the file ({_one_line(exc)}); save it with "
                        f"numpy.save / numpy.savez") from None
    if not isinstance(arr, np.ndarray):
        raise UserError(f"{shown}: expected a numpy array, got {type(arr).__name__}")
    n_total = arr.shape[0] if arr.ndim else 0
    arr = _check_pixels(arr, shown, limit)
    images = torch.from_numpy(arr)
    if labels is not None:
        labels = _check_labels(labels, n_total, shown)[: images.shape[0]]
    return images, labels


def _pick_key(files: list[str], wanted: tuple[str, ...], shown: str, required: bool = False):
    for key in wanted:
        if key in files:
            return key
    if required:
        if len(files) == 1:
            return files[0]
        raise UserError(f"{shown}: holds arrays {', '.join(files) or '(none)'}; store the "
                        f"images under key 'images' (or 'x'), labels under 'labels' (or 'y')")
    return None


def _check_pixels(arr: np.ndarray, shown: str, limit: int | None) -> np.ndarray:
    """Validate a channels-last pixel array and return uint8 [N, C, H, W], contiguous."""
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
        hint = ""
        if arr.ndim == 4 and arr.shape[1] in (1, 3):
            hint = " (it looks channels-first: save arr.transpose(0, 2, 3, 1))"
        raise UserError(f"{shown}: array has shape {arr.shape}; expected (N, H, W) or "
                        f"(N, H, W, C) with C 1 or 3{hint}")
    if arr.shape[0] == 0 or 0 in arr.shape[1:3]:
        raise UserError(f"{shown}: holds 0 images (shape {arr.shape}); save at least one image")
    if limit is not None:
        arr = arr[:limit]
    kind = arr.dtype.kind
    if kind in "fc":
        bad = ~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
        if bad.any():
            raise UserError(f"{shown}: holds NaN or inf (first at image {int(np.argmax(bad))}); "
                            f"expected uint8 pixels 0..255")
        raise UserError(f"{shown}: holds {arr.dtype}; expected uint8 pixels 0..255 (for floats "
                        f"in [0, 1] save np.round(x * 255).astype(np.uint8))")
    if kind not in "iu":
        raise UserError(f"{shown}: holds {arr.dtype}; expected uint8 pixels 0..255")
    if arr.dtype != np.uint8:
        flat = arr.reshape(len(arr), -1)
        bad = ((flat < 0) | (flat > 255)).any(axis=1)
        if bad.any():
            raise UserError(f"{shown}: values out of 0..255 (min {int(flat.min())}, max "
                            f"{int(flat.max())}; first at image {int(np.argmax(bad))}); "
                            f"expected uint8 pixels 0..255")
    if arr.ndim == 3:
        arr = arr[:, None]  # [N, 1, H, W]
    else:
        arr = arr.transpose(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    return np.array(arr, dtype=np.uint8, order="C")  # a copy: never a view of a memmap


def _check_labels(labels: np.ndarray, n: int, shown: str) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.kind not in "iu":
        raise UserError(f"{shown}: labels have shape {labels.shape} and dtype {labels.dtype}; "
                        f"expected {n} integers, one per image")
    return torch.from_numpy(labels.astype(np.int64))


# --- folder of images ------------------------------------------------------------------


def _read_folder(folder: Path, shown: str, limit: int | None):
    from PIL import Image  # lazy: start-up time

    files = sorted(
        (f for f in folder.iterdir()
         if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")),
        key=lambda f: f.name,
    )
    if not files:
        raise UserError(f"{shown}: folder holds no image files ({' '.join(IMAGE_SUFFIXES)}); "
                        f"put the images directly in it (subfolders are not searched)")
    if limit is not None:
        files = files[:limit]
    arrays: list[np.ndarray] = []  # [H, W] for gray, [H, W, 3] for colour
    first: tuple[str, tuple[int, int]] | None = None
    for f in files:
        arr = _decode(f, Image)
        size = arr.shape[:2]
        if first is None:
            first = (f.name, size)
        elif size != first[1]:
            raise UserError(f"{shown}: {f.name} is {size[0]}x{size[1]} (HxW) but the first image "
                            f"{first[0]} is {first[1][0]}x{first[1][1]}; make all images one size")
        arrays.append(arr)
    if all(a.ndim == 2 for a in arrays):
        stacked = np.stack(arrays)[:, None]  # [N, 1, H, W]
    else:
        rgb = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
        stacked = np.stack(rgb).transpose(0, 3, 1, 2)  # [N, 3, H, W]
    return torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.uint8)), None


def _decode(f: Path, Image) -> np.ndarray:
    try:
        with Image.open(f) as im:
            im.seek(0)
            im.load()
            if im.mode in _DEEP_MODES:
                raise UserError(f"{f}: holds {im.mode} pixels (16-bit or float); expected 8-bit "
                                f"images, save them as 8-bit PNG")
            if im.mode in _GRAY_MODES or (im.mode == "P" and _gray_palette(im)):
                return np.asarray(im.convert("L"))
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, EOFError, struct.error,
            Image.DecompressionBombError) as exc:
        raise UserError(f"{f}: could not decode the image ({_one_line(exc)}); "
                        f"re-save it or remove it from the folder") from None


def _gray_palette(im) -> bool:
    palette = im.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
