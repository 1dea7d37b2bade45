"""The paper's array-backed RGB sets, read from their own on-disk formats.

Each set is read straight into arrays (no per-image PIL decoding), only the files of the
requested split, and for ``limit`` only as many files as the first ``limit`` images need.
Folders are torchvision's layout, so ``--download`` (torchvision's own class, which
checks the archive's md5) fills exactly what is read here; reading does not re-check
md5 sums, so hand-copied files and small test fixtures load too.

- ``cifar10``: ``cifar-10-batches-py/data_batch_1..5`` (train), ``test_batch``;
  50,000 / 10,000 images, labels 0..9.
- ``cifar100``: ``cifar-100-python/train``, ``test``; 50,000 / 10,000, fine labels 0..99.
- ``svhn``: ``svhn/train_32x32.mat``, ``test_32x32.mat`` (or directly in the root, where
  ``torchvision.datasets.SVHN(root)`` puts them); 73,257 / 26,032, digit 0 labelled 0.
- ``imagenet32``: ``Imagenet32_train_npz/train_data_batch_1..10.npz`` and
  ``Imagenet32_val_npz/val_data.npz`` (the val set is the test split); 1,281,167 /
  50,000, labels 0..999.

All are ``uint8 [N, 3, 32, 32]``. CIFAR batches are Python pickles of a dict with
``data`` (uint8 [N, 3072], channel-major: 1024 red, 1024 green, 1024 blue values, rows
top to bottom) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); keys may be
``str`` (the originals, Python 2 pickles read with latin-1) or ``bytes``. SVHN's are
MATLAB files with ``X`` [32, 32, 3, N] and ``y`` [N, 1], digit 0 stored as 10 (read with
scipy.io). Downsampled ImageNet (Chrabaszcz et al. 2017) ships as npz batches with
``data`` [N, 3072] (CIFAR's channel-major order) and 1-based ``labels``; the ImageNet32
folders may also sit in a folder ``imagenet32/`` under the root.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .files import corrupt, missing, tv_download
from .images import ImageSet

CIFAR = {
    # name: (folder, train files, test files, label key, torchvision class name)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                ["test_batch"], "labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100"),
}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
IMAGENET32_URL = "https://image-net.org/download-images"
IMAGENET32_DIRS = {"train": "Imagenet32_train_npz", "test": "Imagenet32_val_npz"}


def _pixels(data: np.ndarray) -> torch.Tensor:
    """[N, 3072] channel-major uint8 -> uint8 [N, 3, 32, 32] tensor (a view, no copy)."""
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).view(-1, 3, 32, 32)


def _take(images: torch.Tensor, labels: np.ndarray, limit: int | None):
    """The first ``limit`` images, copied so the full arrays can be freed."""
    if limit is not None and limit < len(images):
        return images[:limit].clone(), labels[:limit].copy()
    return images, labels


# --- CIFAR-10 / CIFAR-100 --------------------------------------------------------------


def _cifar_loader(name: str):
    folder, train_files, test_files, label_key, tv_name = CIFAR[name]

    def load(split: str, *, root: Path, download: bool = False, limit: int | None = None,
             **_: object) -> ImageSet:
        base = Path(root) / folder
        files = train_files if split == "train" else test_files
        paths = [base / f for f in files]
        if not all(p.is_file() for p in paths):
            if download:
                import torchvision.datasets as tvd  # lazy: start-up time

                tv_download(name, base, lambda: getattr(tvd, tv_name)(
                    root=str(root), train=(split == "train"), download=True))
            if not all(p.is_file() for p in paths):
                listed = (f"{paths[0]} .. {paths[-1].name}" if len(paths) > 1 else str(paths[0]))
                archive = tv_name.lower().replace("cifar", "cifar-") + "-python.tar.gz"
                raise missing(name, split, f"{listed} (extract {archive} into {root})")
        images, labels = [], []
        have = 0
        for path in paths:
            if limit is not None and have >= limit:
                break  # later batches are not needed: not even opened
            data, lab = _read_cifar_batch(name, path, label_key)
            images.append(data)
            labels.append(lab)
            have += len(lab)
        x = _pixels(np.concatenate(images) if len(images) > 1 else images[0])
        y = np.concatenate(labels)
        x, y = _take(x, y, limit)
        return ImageSet(name, split, x, torch.from_numpy(y.astype(np.int64)))

    load.__doc__ = f"{name}: uint8 [N, 3, 32, 32] from {folder}/ (pickled batches)."
    return load


def _read_cifar_batch(name: str, path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... on a damaged file
        raise corrupt(name, path, exc) from None
    if not isinstance(entry, dict):
        raise corrupt(name, path, f"holds a {type(entry).__name__}, not a dict")
    entry = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise corrupt(name, path, f"no 'data' and {label_key!r} entries "
                                  f"(found {', '.join(map(str, entry)) or 'none'})")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or len(data) != len(labels):
        raise corrupt(name, path, f"data is {data.dtype} {data.shape} with {len(labels)} "
                                  "labels; expected uint8 [N, 3072] with N labels")
    return data, labels


load_cifar10 = _cifar_loader("cifar10")
load_cifar100 = _cifar_loader("cifar100")


# --- SVHN --------------------------------------------------------------------------------


def load_svhn(split: str, *, root: Path, download: bool = False, limit: int | None = None,
              **_: object) -> ImageSet:
    """SVHN cropped digits, uint8 [N, 3, 32, 32], labels 0..9 (the files' 10 becomes 0)."""
    filename = SVHN_FILES[split]
    primary = Path(root) / "svhn" / filename
    path = next((p for p in (primary, Path(root) / filename) if p.is_file()), None)
    if path is None and download:
        from torchvision.datasets import SVHN  # lazy: start-up time

        tv_download("svhn", primary.parent,
                    lambda: SVHN(root=str(primary.parent), split=split, download=True))
        path = primary if primary.is_file() else None
    if path is None:
        raise missing("svhn", split, f"{primary} (the format 2 'cropped digits' file "
                                     f"{filename} from http://ufldl.stanford.edu/housenumbers/)")
    try:
        import scipy.io as sio  # lazy: start-up time

        mat = sio.loadmat(str(path), variable_names=["X", "y"])
    except Exception as exc:  # MatReadError, ValueError, OSError on a damaged file
        raise corrupt("svhn", path, exc) from None
    if "X" not in mat or "y" not in mat:
        raise corrupt("svhn", path, "no X and y variables")
    x, y = mat["X"], np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise corrupt("svhn", path, f"X is {x.dtype} {x.shape} with {len(y)} labels; expected "
                                    "uint8 [32, 32, 3, N] with N labels")
    n = len(y) if limit is None else min(limit, len(y))
    images = np.ascontiguousarray(x[..., :n].transpose(3, 2, 0, 1))  # [N, C, H, W]
    labels = y[:n].copy()
    labels[labels == 10] = 0  # SVHN stores digit 0 as 10
    return ImageSet("svhn", split, torch.from_numpy(images), torch.from_numpy(labels))


# --- ImageNet32 --------------------------------------------------------------------------


def _imagenet32_files(root: Path, split: str) -> tuple[Path, list[Path]]:
    """(folder looked in first, batch files found in order): train_data_batch_1..N sorted
    by number, or val_data.npz."""
    folder = IMAGENET32_DIRS[split]
    candidates = [Path(root) / folder, Path(root) / "imagenet32" / folder,
                  Path(root) / "imagenet32"]
    for d in candidates:
        if split == "test":
            if (d / "val_data.npz").is_file():
                return candidates[0], [d / "val_data.npz"]
            continue
        found = [p for p in d.glob("train_data_batch_*.npz")
                 if re.fullmatch(r"train_data_batch_\d+\.npz", p.name)] if d.is_dir() else []
        if found:
            return candidates[0], sorted(found, key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return candidates[0], []


def load_imagenet32(split: str, *, root: Path, limit: int | None = None,
                    **_: object) -> ImageSet:
    """Downsampled ImageNet 32x32, uint8 [N, 3, 32, 32], labels 0..999 (files: 1..1000)."""
    folder, paths = _imagenet32_files(root, split)
    if not paths:
        files = ("train_data_batch_1.npz .. train_data_batch_10.npz" if split == "train"
                 else "val_data.npz")
        raise missing("imagenet32", split, f"{files} in {folder}/ (or in {Path(root)}/imagenet32/)",
                      download=f"unzip {folder.name}.zip from 'Downsampled ImageNet 32x32' at "
                               f"{IMAGENET32_URL} (free ImageNet account) there; --download "
                               "cannot fetch it")
    # Labels first (small): they size the output, so the pixels are copied only once.
    sizes = []
    for path in paths:
        if limit is not None and sum(sizes) >= limit:
            break
        sizes.append(len(_npz_array(path, "labels")))
    n = sum(sizes) if limit is None else min(limit, sum(sizes))
    images = torch.empty((n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    start = 0
    for path, size in zip(paths, sizes, strict=False):
        take = min(size, n - start)
        if take <= 0:
            break
        data = _npz_array(path, "data")
        lab = _npz_array(path, "labels").astype(np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape != (size, 3072):
            raise corrupt("imagenet32", path, f"data is {data.dtype} {data.shape}; expected "
                                              f"uint8 [{size}, 3072]", download=False)
        if lab.size and (lab.min() < 1 or lab.max() > 1000):
            raise corrupt("imagenet32", path, f"labels span {lab.min()}..{lab.max()}; "
                                              "expected 1..1000", download=False)
        images[start:start + take] = _pixels(data[:take])
        labels[start:start + take] = torch.from_numpy(lab[:take] - 1)
        start += take
    return ImageSet("imagenet32", split, images, labels)


def _npz_array(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise KeyError(f"no {key!r} array (found {', '.join(z.files) or 'none'})")
            return z[key]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        detail = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else exc
        raise corrupt("imagenet32", path, detail, download=False) from None
