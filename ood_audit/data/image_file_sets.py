"""The paper's sets stored as one image file per picture, decoded with Pillow.

Only the files of the first ``limit`` images of the requested split are opened. Folders
are torchvision's layout, so ``--download`` (torchvision's own class) fills exactly what
is read here; reading does not re-check md5 sums.

- ``celeba``: ``celeba/img_align_celeba/*.jpg`` (the aligned 178x218 crops) and
  ``celeba/list_eval_partition.txt`` (lines ``000001.jpg 0``; 0 train, 1 valid, 2 test).
  Each image is centre-cropped to 140x140 (to the shorter side when smaller) and
  resized to 32x32 with Pillow's bilinear filter (antialiased when shrinking), the
  usual 32x32 CelebA of flow papers. uint8 [N, 3, 32, 32]; 162,770 train / 19,962 test
  (the valid split is not used). No class labels (-1).
- ``omniglot``: ``omniglot-py/images_background/<alphabet>/<character>/*.png`` (train,
  964 characters, 19,280 images) and ``omniglot-py/images_evaluation/...`` (test, 659
  characters, 13,180 images). The 105x105 black-on-white strokes are resized to 28x28
  (Pillow bilinear, antialiased) and **inverted** (255 - x), so strokes are bright on a
  dark background like MNIST's. uint8 [N, 1, 28, 28]; label = the character's index in
  the split, alphabets, characters and files taken in sorted name order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .files import corrupt, missing, one_line, tv_download
from .images import ImageSet

CELEBA_CROP = 140
CELEBA_SIZE = 32
CELEBA_SPLITS = {"train": 0, "test": 2}  # list_eval_partition.txt codes (1 = valid)
OMNIGLOT_SIZE = 28
OMNIGLOT_DIRS = {"train": "images_background", "test": "images_evaluation"}


def _open(name: str, path: Path):
    from PIL import Image, UnidentifiedImageError  # lazy: start-up time

    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise UserError(f"{name}: {path} is missing (listed for this split): copy the whole "
                        "image folder again") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise corrupt(name, path, f"could not decode it: {one_line(exc)}") from None


# --- CelebA ------------------------------------------------------------------------------


def load_celeba(split: str, *, root: Path, download: bool = False, limit: int | None = None,
                **_: object) -> ImageSet:
    """CelebA faces, centre crop 140, resized to uint8 [N, 3, 32, 32]; labels -1."""
    base = Path(root) / "celeba"
    partition, folder = base / "list_eval_partition.txt", base / "img_align_celeba"
    if not (partition.is_file() and folder.is_dir()) and download:
        from torchvision.datasets import CelebA  # lazy: start-up time

        tv_download("celeba", base, lambda: CelebA(root=str(root), split="all",
                                                   target_type=[], download=True))
    if not (partition.is_file() and folder.is_dir()):
        raise missing("celeba", split, f"{folder}/*.jpg and {partition} (CelebA's "
                                       f"Img/img_align_celeba.zip unzipped into {base}, and "
                                       "Eval/list_eval_partition.txt)")
    names = _celeba_split(partition, CELEBA_SPLITS[split])
    if limit is not None:
        names = names[:limit]
    from PIL import Image  # lazy: start-up time

    out = np.empty((len(names), CELEBA_SIZE, CELEBA_SIZE, 3), dtype=np.uint8)
    for i, fname in enumerate(names):
        img = _open("celeba", folder / fname).convert("RGB")
        w, h = img.size
        c = min(CELEBA_CROP, w, h)
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))  # as CenterCrop
        img = img.crop((left, top, left + c, top + c))
        out[i] = np.asarray(img.resize((CELEBA_SIZE, CELEBA_SIZE), Image.BILINEAR))
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return ImageSet("celeba", split, images, torch.full((len(names),), -1, dtype=torch.int64))


def _celeba_split(path: Path, code: int) -> list[str]:
    """File names of one split, in the file's order."""
    names = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise corrupt("celeba", path, exc) from None
    for n, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise corrupt("celeba", path, f"line {n} is {line.strip()!r}, expected "
                                          "'<file>.jpg <0|1|2>'")
        if int(parts[1]) == code:
            names.append(parts[0])
    return names


# --- Omniglot ----------------------------------------------------------------------------


def load_omniglot(split: str, *, root: Path, download: bool = False,
                  limit: int | None = None, **_: object) -> ImageSet:
    """Omniglot characters, 28x28, inverted (bright strokes); labels = character index."""
    base = Path(root) / "omniglot-py"
    folder = base / OMNIGLOT_DIRS[split]
    if not folder.is_dir() and download:
        from torchvision.datasets import Omniglot  # lazy: start-up time

        tv_download("omniglot", base, lambda: Omniglot(root=str(root),
                                                       background=(split == "train"),
                                                       download=True))
    files = _omniglot_files(folder, limit) if folder.is_dir() else []
    if not files:
        raise missing("omniglot", split, f"{folder}/<alphabet>/<character>/*.png (unzip "
                                         f"{folder.name}.zip into {base})")
    from PIL import Image  # lazy: start-up time

    out = np.empty((len(files), 1, OMNIGLOT_SIZE, OMNIGLOT_SIZE), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    for i, (path, label) in enumerate(files):
        img = _open("omniglot", path).convert("L")
        small = img.resize((OMNIGLOT_SIZE, OMNIGLOT_SIZE), Image.BILINEAR)
        out[i, 0] = 255 - np.asarray(small)  # strokes bright, as in MNIST
        labels[i] = label
    return ImageSet("omniglot", split, torch.from_numpy(out), torch.from_numpy(labels))


def _omniglot_files(folder: Path, limit: int | None) -> list[tuple[Path, int]]:
    """(png, character index) in sorted order, stopping after ``limit`` files."""
    out: list[tuple[Path, int]] = []
    label = 0
    for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            for png in sorted(character.glob("*.png")):
                if limit is not None and len(out) >= limit:
                    return out
                out.append((png, label))
            label += 1
    return out
