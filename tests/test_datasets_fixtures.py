"""The paper's data sets, each read from a tiny fixture written in that set's own on-disk
format (pickled CIFAR batches, SVHN's .mat files, CelebA's jpgs and partition list,
Omniglot's pngs, KMNIST's IDX files, ImageNet32's npz batches): these machines cannot
download them. Shapes, labels, pixels, ``limit`` and the missing/corrupt file errors."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ood_audit.data import DATASETS, load_dataset
from ood_audit.errors import UserError

PAPER_SETS = ["kmnist", "omniglot", "cifar10", "cifar100", "svhn", "celeba", "imagenet32"]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _chw(flat: np.ndarray) -> np.ndarray:
    """[N, 3072] channel-major rows -> [N, 3, 32, 32]."""
    return flat.reshape(-1, 3, 32, 32)


# --- writers, one per on-disk format -----------------------------------------------------


def write_cifar10(root: Path, per_batch: int = 2, n_test: int = 3) -> dict:
    """cifar-10-batches-py/data_batch_1..5 and test_batch, pickled with bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng, truth = _rng(10), {"train": ([], []), "test": ([], [])}
    files = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)]
    for fname, split, n in files + [("test_batch", "test", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        entry = {b"batch_label": fname.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"x.png"] * n}
        with open(folder / fname, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        truth[split][0].append(data)
        truth[split][1].extend(labels)
    return {s: (_chw(np.concatenate(d)), np.array(y)) for s, (d, y) in truth.items()}


def write_cifar100(root: Path) -> dict:
    """cifar-100-python/train and test with str keys (as the originals read in Python 3)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng, truth = _rng(100), {}
    for split, n in (("train", 4), ("test", 3)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        entry = {"data": data, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]}
        with open(folder / split, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        truth[split] = (_chw(data), np.array(fine))
    return truth


def write_svhn(root: Path, folder: str = "svhn") -> dict:
    """train_32x32.mat / test_32x32.mat: X [32, 32, 3, N] uint8, y [N, 1], 10 = digit 0."""
    from scipy.io import savemat

    (root / folder).mkdir(parents=True, exist_ok=True)
    rng, truth = _rng(7), {}
    for split, digits in (("train", [1, 0, 9, 5]), ("test", [0, 3, 7])):
        n = len(digits)
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10 if d == 0 else d] for d in digits], dtype=np.uint8)
        savemat(root / folder / f"{split}_32x32.mat", {"X": x, "y": y})
        truth[split] = (x.transpose(3, 2, 0, 1), np.array(digits))
    return truth


CELEBA_PARTS = [0, 0, 2, 1, 0, 2, 2]  # train, train, test, valid, train, test, test
CENTRE, BORDER = (200, 60, 30), (0, 0, 255)


def _centre(i: int) -> np.ndarray:
    return np.array(CENTRE) + np.array([-10, 10, 5]) * i


def write_celeba(root: Path) -> list[str]:
    """celeba/img_align_celeba/00000i.jpg (178x218: a coloured 140x140 centre in a blue
    border) and celeba/list_eval_partition.txt. Returns the file names."""
    from PIL import Image

    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names, lines = [], []
    for i, part in enumerate(CELEBA_PARTS, start=1):
        img = np.empty((218, 178, 3), dtype=np.uint8)
        img[:] = BORDER
        shade = _centre(i)  # each image its own centre colour
        img[39:179, 19:159] = shade
        name = f"{i:06d}.jpg"
        # 4:4:4 chroma, so the blue border does not bleed into the centre
        Image.fromarray(img).save(base / "img_align_celeba" / name, quality=95, subsampling=0)
        names.append(name)
        lines.append(f"{name} {part}")
    (base / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return names


def write_omniglot(root: Path) -> None:
    """omniglot-py/images_background/<alphabet>/<character>/*.png: 105x105 mode-1 images,
    black strokes (a square) on white; two alphabets, three characters, two drawings each
    (listed out of order on purpose); one evaluation character."""
    from PIL import Image

    layout = {"images_background": {"Beta": ["character02", "character01"],
                                     "Alpha": ["character01"]},
              "images_evaluation": {"Gamma": ["character01"]}}
    for split_dir, alphabets in layout.items():
        for alphabet, chars in alphabets.items():
            for char in chars:
                d = root / "omniglot-py" / split_dir / alphabet / char
                d.mkdir(parents=True)
                for k in (2, 1):
                    img = np.ones((105, 105), dtype=bool)  # white
                    if k == 1:
                        img[20:85, 20:85] = False  # a big black stroke
                    Image.fromarray(img).save(d / f"{char}_{k:02d}.png")


def write_idx(root: Path, folder: str) -> dict:
    rng, raw, truth = _rng(3), root / folder / "raw", {}
    raw.mkdir(parents=True)
    for split, prefix, n in (("train", "train", 3), ("test", "t10k", 2)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">ii", 2049, n) + labels.tobytes())
        truth[split] = (images[:, None], labels.astype(np.int64))
    return truth


def write_imagenet32(root: Path, parent: Path | None = None) -> dict:
    """Imagenet32_train_npz/train_data_batch_{1,2,10}.npz (2, 3, 2 images; batch 10 sorts
    last) and Imagenet32_val_npz/val_data.npz; labels 1-based."""
    base = parent or root
    rng, truth = _rng(32), {}
    train_dir, val_dir = base / "Imagenet32_train_npz", base / "Imagenet32_val_npz"
    train_dir.mkdir(parents=True)
    val_dir.mkdir(parents=True)
    data, labels = [], []
    for b, n in ((1, 2), (2, 3), (10, 2)):
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = rng.integers(1, 1001, n).tolist()
        lab[0] = 1000 if b == 10 else 1
        np.savez(train_dir / f"train_data_batch_{b}.npz", data=d, labels=lab,
                 mean=np.zeros(3072))
        data.append(d)
        labels += lab
    truth["train"] = (_chw(np.concatenate(data)), np.array(labels) - 1)
    d = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    lab = [5, 1, 1000]
    np.savez_compressed(val_dir / "val_data.npz", data=d, labels=lab)
    truth["test"] = (_chw(d), np.array(lab) - 1)
    return truth


# --- registry ------------------------------------------------------------------------------


def test_registry_holds_the_papers_sets():
    shapes = {"kmnist": (1, 28, 28), "omniglot": (1, 28, 28), "cifar10": (3, 32, 32),
              "cifar100": (3, 32, 32), "svhn": (3, 32, 32), "celeba": (3, 32, 32),
              "imagenet32": (3, 32, 32)}
    for name, shape in shapes.items():
        assert DATASETS[name].shape == shape and set(DATASETS[name].splits) == {"train", "test"}


def _check(ds, name: str, split: str, images: np.ndarray, labels) -> None:
    assert ds.name == name and ds.split == split and ds.adaptation is None
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert ds.shape == DATASETS[name].shape
    assert ds.images.shape == (len(labels), *DATASETS[name].shape)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == list(labels)
    if images is not None:
        assert torch.equal(ds.images, torch.from_numpy(np.ascontiguousarray(images)))


# --- array-backed sets: exact pixels -------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_pickled_batches(tmp_path, split):
    truth = write_cifar10(tmp_path)
    images, labels = truth[split]
    _check(load_dataset("cifar10", split, root=tmp_path), "cifar10", split, images, labels)


def test_cifar10_limit_reads_only_needed_batches(tmp_path):
    truth = write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"broken")
    ds = load_dataset("cifar10", "train", root=tmp_path, limit=3)  # batches 1 and 2 only
    _check(ds, "cifar10", "train", truth["train"][0][:3], truth["train"][1][:3])
    with pytest.raises(UserError, match="data_batch_3.*truncated or corrupt") as err:
        load_dataset("cifar10", "train", root=tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_fine_labels(tmp_path, split):
    truth = write_cifar100(tmp_path)
    images, labels = truth[split]
    _check(load_dataset("cifar100", split, root=tmp_path), "cifar100", split, images, labels)
    assert len(load_dataset("cifar100", split, root=tmp_path, limit=2)) == 2


@pytest.mark.parametrize("split", ["train", "test"])
def test_svhn_mat_files_digit_zero_is_label_zero(tmp_path, split):
    truth = write_svhn(tmp_path)
    images, labels = truth[split]
    ds = load_dataset("svhn", split, root=tmp_path)
    _check(ds, "svhn", split, images, labels)
    assert 0 in ds.labels.tolist() and 10 not in ds.labels.tolist()
    _check(load_dataset("svhn", split, root=tmp_path, limit=2), "svhn", split, images[:2],
           labels[:2])


def test_svhn_also_found_directly_in_root(tmp_path):
    truth = write_svhn(tmp_path, folder=".")
    _check(load_dataset("svhn", "test", root=tmp_path), "svhn", "test", *truth["test"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_imagenet32_npz_batches(tmp_path, split):
    truth = write_imagenet32(tmp_path)
    images, labels = truth[split]
    ds = load_dataset("imagenet32", split, root=tmp_path)
    _check(ds, "imagenet32", split, images, labels)
    assert ds.labels.min() >= 0 and ds.labels.max() <= 999


def test_imagenet32_limit_spans_batches_in_numeric_order(tmp_path):
    truth = write_imagenet32(tmp_path / "imagenet32")  # the alternative parent folder
    root = tmp_path
    ds = load_dataset("imagenet32", "train", root=root, limit=4)
    _check(ds, "imagenet32", "train", truth["train"][0][:4], truth["train"][1][:4])
    (tmp_path / "imagenet32" / "Imagenet32_train_npz" / "train_data_batch_10.npz").write_bytes(
        b"PK\x03\x04 broken")
    assert len(load_dataset("imagenet32", "train", root=root, limit=5)) == 5  # 10 unopened


# --- image-file sets ---------------------------------------------------------------------------


def test_celeba_reads_split_crops_centre_and_resizes(tmp_path):
    write_celeba(tmp_path)
    for split, idx in (("train", [1, 2, 5]), ("test", [3, 6, 7])):
        ds = load_dataset("celeba", split, root=tmp_path)
        _check(ds, "celeba", split, None, [-1] * 3)
        for row, i in enumerate(idx):
            colour = torch.tensor(_centre(i), dtype=torch.float32)
            mean = ds.images[row].float().mean(dim=(1, 2))
            assert torch.allclose(mean, colour, atol=4), (split, i, mean)
            # the blue border is cropped away entirely: no pixel near it
            assert ds.images[row, 2].max() < 120 and ds.images[row, 0].min() > 100


def test_celeba_limit_opens_only_needed_files(tmp_path):
    names = write_celeba(tmp_path)
    (tmp_path / "celeba" / "img_align_celeba" / names[4]).write_bytes(b"\xff\xd8 broken")
    assert len(load_dataset("celeba", "train", root=tmp_path, limit=2)) == 2
    with pytest.raises(UserError, match=f"{names[4]}.*could not decode") as err:
        load_dataset("celeba", "train", root=tmp_path)
    assert "\n" not in str(err.value)


def test_omniglot_sorted_labels_resized_and_inverted(tmp_path):
    write_omniglot(tmp_path)
    ds = load_dataset("omniglot", "train", root=tmp_path)
    # Alpha/character01 (label 0), Beta/character01 (1), Beta/character02 (2); files sorted:
    # _01 (the stroke) before _02 (blank)
    _check(ds, "omniglot", "train", None, [0, 0, 1, 1, 2, 2])
    stroke, blank = ds.images[0, 0], ds.images[1, 0]
    assert blank.max() == 0  # white paper -> black background
    assert stroke[14, 14] == 255 and stroke[0, 0] == 0  # black stroke -> bright, like MNIST
    test = load_dataset("omniglot", "test", root=tmp_path)
    _check(test, "omniglot", "test", None, [0, 0])
    assert load_dataset("omniglot", "train", root=tmp_path, limit=3).labels.tolist() == [0, 0, 1]


@pytest.mark.parametrize("split", ["train", "test"])
def test_kmnist_idx(tmp_path, split):
    truth = write_idx(tmp_path, "KMNIST")
    _check(load_dataset("kmnist", split, root=tmp_path), "kmnist", split, *truth[split])


# --- missing and corrupt files ---------------------------------------------------------------

EXPECTED = {
    "kmnist": ["KMNIST/raw", "--download"],
    "omniglot": ["omniglot-py/images_background/<alphabet>/<character>/*.png",
                 "images_background.zip", "--download"],
    "cifar10": ["cifar-10-batches-py/data_batch_1", "data_batch_5", "cifar-10-python.tar.gz",
                "--download"],
    "cifar100": ["cifar-100-python/train", "cifar-100-python.tar.gz", "--download"],
    "svhn": ["svhn/train_32x32.mat", "--download"],
    "celeba": ["celeba/img_align_celeba/*.jpg", "celeba/list_eval_partition.txt",
               "--download"],
    "imagenet32": ["train_data_batch_1.npz", "Imagenet32_train_npz/", "image-net.org",
                   "cannot fetch"],
}


@pytest.mark.parametrize("name", PAPER_SETS)
def test_missing_set_says_what_to_put_where(tmp_path, name):
    with pytest.raises(UserError) as err:
        load_dataset(name, "train", root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "--data-root" in msg
    for needle in EXPECTED[name]:
        assert needle in msg, (needle, msg)
    if name == "imagenet32":
        assert "add --download" not in msg


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download cifar10") as err:
        load_dataset("cifar10", root=tmp_path, download=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,path,content", [
    ("cifar100", "cifar-100-python/test", b"not a pickle"),
    ("svhn", "svhn/test_32x32.mat", b"MATLAB 5.0 broken"),
    ("imagenet32", "Imagenet32_val_npz/val_data.npz", b"PK\x03\x04 broken"),
])
def test_corrupt_file_is_named(tmp_path, name, path, content):
    f = tmp_path / path
    f.parent.mkdir(parents=True)
    f.write_bytes(content)
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        load_dataset(name, "test", root=tmp_path)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_wrong_layout_in_a_pickle_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(UserError, match=r"expected uint8 \[N, 3072\]"):
        load_dataset("cifar10", "test", root=tmp_path)
