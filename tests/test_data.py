"""Tests for ood_audit.data: loaders on real on-disk formats, user files, the shape
rule and the pixel conventions. No network; real-data checks skip visibly."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ood_audit.data import (
    DATASETS,
    ImageSet,
    adapt_to_shape,
    bits_per_dim,
    data_root,
    dequantize,
    discrete_log_likelihood_bound,
    load_dataset,
)
from ood_audit.data.preprocess import _place
from ood_audit.errors import UserError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# --- fixtures in torchvision's raw IDX layout ----------------------------------------


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def write_idx_set(root: Path, folder: str, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tiny train (3 images) / test (2 images) set under root/folder/raw; returns the truth."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    truth = {}
    for split, prefix, n in (("train", "train", 3), ("test", "t10k", 2)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        truth[split] = (images, labels)
    return truth


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_fixture_round_trip(tmp_path, name, folder, split):
    truth = write_idx_set(tmp_path, folder, seed=len(name))
    ds = load_dataset(name, split, root=tmp_path)
    images, labels = truth[split]
    assert ds.name == name and ds.split == split and ds.adaptation is None
    assert ds.images.shape == (len(images), 1, 28, 28) and ds.shape == (1, 28, 28)
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == labels.tolist()
    assert len(ds) == len(images)
    assert DATASETS[name].shape == ds.shape


def test_idx_limit_keeps_first_images(tmp_path):
    truth = write_idx_set(tmp_path, "MNIST", seed=1)
    ds = load_dataset("mnist", "train", root=tmp_path, limit=2)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(truth["train"][0][:2]))
    assert ds.labels.tolist() == truth["train"][1][:2].tolist()


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_missing_data_names_folder_and_fix(tmp_path, name, folder):
    with pytest.raises(UserError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / folder / "raw") in msg and "--data-root" in msg
    assert "OOD_AUDIT_DATA" in msg and "\n" not in msg


def test_failed_download_is_one_line_user_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.mnist as tv_mnist

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download MNIST") as err:
        load_dataset("mnist", root=tmp_path, download=True)
    assert "\n" not in str(err.value)


def test_truncated_idx_file_is_user_error(tmp_path):
    write_idx_set(tmp_path, "MNIST", seed=2)
    f = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        load_dataset("mnist", "test", root=tmp_path)
    assert "\n" not in str(err.value)


# --- registry, data root, names ------------------------------------------------------


def test_registry_names_and_specs():
    assert list(DATASETS) == ["fashionmnist", "mnist", "kmnist", "omniglot", "cifar10",
                              "cifar100", "svhn", "celeba", "imagenet32", "noise-uniform",
                              "noise-gaussian", "constant"]
    for name, spec in DATASETS.items():
        assert spec.name == name and "\n" not in spec.summary and spec.summary
        assert set(spec.splits) == {"train", "test"}
    assert DATASETS["constant"].shape is None


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_AUDIT_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("OOD_AUDIT_DATA")
    assert data_root() == tmp_path / "xdg" / "ood-audit" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_root() == Path.home() / ".cache" / "ood-audit" / "data"


def test_unknown_name_lists_registry():
    with pytest.raises(UserError) as err:
        load_dataset("cifar11")
    assert "cifar11" in str(err.value)
    assert all(name in str(err.value) for name in DATASETS)


def test_missing_path_names_file(tmp_path):
    missing = str(tmp_path / "nope.npy")
    with pytest.raises(UserError, match="no such file") as err:
        load_dataset(missing)
    assert missing in str(err.value)


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"limit": 0}, {"limit": -3}])
def test_bad_split_or_limit(kwargs):
    with pytest.raises(UserError):
        load_dataset("noise-uniform", shape=(1, 4, 4), **kwargs)


def test_imageset_contract():
    with pytest.raises(ValueError):
        ImageSet("x", "test", torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        ImageSet("x", "test", torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(3).long())
    nc = torch.zeros(2, 3, 3, 1, dtype=torch.uint8).permute(0, 3, 1, 2)
    assert ImageSet("x", "test", nc, torch.zeros(2).long()).images.is_contiguous()


# --- real data (skipped visibly without OOD_AUDIT_DATA) ------------------------------


def _real_root(folder: str) -> Path:
    env = os.environ.get("OOD_AUDIT_DATA")
    if not env:
        pytest.skip("OOD_AUDIT_DATA is not set: real MNIST/FashionMNIST checks skipped")
    root = Path(env)
    if not (root / folder / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"{root / folder / 'raw'} lacks the IDX files: real-data check skipped")
    return root


MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.realdata
@pytest.mark.parametrize("name,folder,mean,counts", [
    ("mnist", "MNIST", 0.1307, MNIST_TRAIN_COUNTS),
    ("fashionmnist", "FashionMNIST", 0.2860, [6000] * 10),
])
def test_real_data(name, folder, mean, counts):
    root = _real_root(folder)
    train = load_dataset(name, "train", root=root)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert abs(train.images.double().mean().item() / 255 - mean) < 1e-3
    assert torch.bincount(train.labels).tolist() == counts
    test = load_dataset(name, "test", root=root)
    assert test.images.shape == (10000, 1, 28, 28) and len(test.labels) == 10000


# --- synthetic sets ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["noise-uniform", "noise-gaussian", "constant"])
def test_synthetic_shape_and_determinism(name):
    a = load_dataset(name, shape=(3, 8, 5), limit=300, seed=7)
    assert a.images.shape == (300, 3, 8, 5) and a.images.dtype == torch.uint8
    assert a.labels.tolist() == [-1] * 300 and a.split == "test" and a.name == name
    assert torch.equal(a.images, load_dataset(name, shape=(3, 8, 5), limit=300, seed=7).images)
    assert not torch.equal(a.images, load_dataset(name, shape=(3, 8, 5), limit=300,
                                                  seed=8).images)
    train = load_dataset(name, "train", shape=(3, 8, 5), limit=300, seed=7)
    assert not torch.equal(a.images, train.images)


@pytest.mark.parametrize("name", ["noise-uniform", "noise-gaussian", "constant"])
def test_synthetic_limit_is_a_prefix(name):
    full = load_dataset(name, shape=(1, 28, 28), seed=3)
    assert len(full) == 10000
    head = load_dataset(name, shape=(1, 28, 28), seed=3, limit=1500)
    assert torch.equal(head.images, full.images[:1500])


def test_synthetic_statistics():
    const = load_dataset("constant", shape=(3, 4, 4), limit=500).images.view(500, -1)
    assert torch.equal(const.min(dim=1).values, const.max(dim=1).values)
    assert len(set(const[:, 0].tolist())) > 100  # many different constants
    uni = load_dataset("noise-uniform", shape=(1, 28, 28), limit=2000).images.double()
    assert abs(uni.mean().item() - 127.5) < 1 and uni.min() == 0 and uni.max() == 255
    gau = load_dataset("noise-gaussian", shape=(1, 28, 28), limit=2000).images.double()
    assert abs(gau.mean().item() - 127.5) < 1
    assert 58 < gau.std().item() < 64  # sigma 64, shrunk by clipping


def test_synthetic_needs_shape():
    with pytest.raises(UserError, match="model's input shape"):
        load_dataset("noise-uniform")


# --- user files ----------------------------------------------------------------------


def test_npy_round_trip_gray_and_rgb(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (4, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "g.npy", gray)
    ds = load_dataset(str(tmp_path / "g.npy"))
    assert ds.name == str(tmp_path / "g.npy") and ds.shape == (1, 6, 5)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(gray))
    assert ds.labels.tolist() == [-1] * 4
    rgb = np.random.default_rng(1).integers(0, 256, (3, 6, 5, 3)).astype(np.int64)
    np.save(tmp_path / "c.npy", rgb)
    ds = load_dataset(str(tmp_path / "c.npy"), "train", limit=2)
    assert ds.shape == (3, 6, 5) and ds.images.dtype == torch.uint8 and len(ds) == 2
    assert torch.equal(ds.images, torch.from_numpy(rgb[:2].transpose(0, 3, 1, 2)).to(torch.uint8))
    assert ds.images.is_contiguous() and ds.split == "train"


@pytest.mark.parametrize("image_key,label_key", [("images", "labels"), ("x", "y"),
                                                 ("anything", None)])
def test_npz_round_trip(tmp_path, image_key, label_key):
    images = np.random.default_rng(2).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    arrays = {image_key: images}
    if label_key:
        arrays[label_key] = np.arange(5)
    np.savez(tmp_path / "d.npz", **arrays)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert torch.equal(ds.images, torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous())
    assert ds.labels.tolist() == (list(range(5)) if label_key else [-1] * 5)


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_folder_round_trip_gray_and_mixed(tmp_path):
    rng = np.random.default_rng(3)
    gray = [rng.integers(0, 256, (7, 9), dtype=np.uint8) for _ in range(3)]
    for i, g in enumerate(gray):
        _png(tmp_path / f"img{i}.png", g)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_dataset(str(tmp_path))
    assert ds.shape == (1, 7, 9) and len(ds) == 3
    assert torch.equal(ds.images[:, 0], torch.from_numpy(np.stack(gray)))
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    _png(tmp_path / "img9.png", rgb)
    ds = load_dataset(str(tmp_path), "train")
    assert ds.shape == (3, 7, 9) and len(ds) == 4
    assert torch.equal(ds.images[0], torch.from_numpy(gray[0]).expand(3, -1, -1))
    assert torch.equal(ds.images[3], torch.from_numpy(rgb).permute(2, 0, 1))
    assert len(load_dataset(str(tmp_path), limit=2)) == 2


def _user_error(path: Path, match: str) -> str:
    with pytest.raises(UserError, match=match) as err:
        load_dataset(str(path))
    msg = str(err.value)
    assert path.name in msg and "\n" not in msg
    return msg


def test_npy_errors(tmp_path):
    cases = {
        "rank.npy": (np.zeros((2, 3), np.uint8), "expected \\(N, H, W\\)"),
        "chw.npy": (np.zeros((2, 3, 8, 8), np.uint8), "channels-first"),
        "float.npy": (np.zeros((2, 4, 4), np.float32), "holds float32; expected uint8"),
        "nan.npy": (np.full((2, 4, 4), np.nan), "NaN or inf"),
        "range.npy": (np.full((2, 4, 4), 300, np.int32), "out of 0..255"),
        "neg.npy": (np.full((2, 4, 4), -1, np.int16), "out of 0..255"),
        "empty.npy": (np.zeros((0, 4, 4), np.uint8), "0 images"),
        "bool.npy": (np.zeros((2, 4, 4), bool), "holds bool"),
    }
    for name, (array, match) in cases.items():
        np.save(tmp_path / name, array)
        _user_error(tmp_path / name, match)
    (tmp_path / "bad.npy").write_bytes(b"not numpy at all")
    _user_error(tmp_path / "bad.npy", "could not read")


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 4), np.uint8), b=np.zeros(2))
    assert "'images'" in _user_error(tmp_path / "two.npz", "holds arrays a, b")
    np.savez(tmp_path / "lab.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3))
    _user_error(tmp_path / "lab.npz", "labels")
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 broken")
    _user_error(tmp_path / "zip.npz", "could not read")
    (tmp_path / "x.csv").write_text("1,2")
    _user_error(tmp_path / "x.csv", "unsupported file type")


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _user_error(empty, "no image files")

    sizes = tmp_path / "sizes"
    sizes.mkdir()
    _png(sizes / "a.png", np.zeros((28, 28), np.uint8))
    _png(sizes / "b.png", np.zeros((32, 30), np.uint8))
    msg = _user_error(sizes, "b.png is 32x30")
    assert "a.png is 28x28" in msg

    broken = tmp_path / "broken"
    broken.mkdir()
    _png(broken / "a.png", np.zeros((4, 4), np.uint8))
    (broken / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert "b.jpg" in _user_error(broken, "could not decode")


# --- adapt_to_shape ------------------------------------------------------------------


def _set(images: torch.Tensor) -> ImageSet:
    return ImageSet("t", "test", images, torch.full((len(images),), -1, dtype=torch.int64))


def test_adapt_identity_returns_same_object():
    s = _set(torch.zeros(2, 1, 5, 5, dtype=torch.uint8))
    assert adapt_to_shape(s, (1, 5, 5)) is s


def test_adapt_gray_to_rgb_replicates():
    gray = torch.randint(0, 256, (3, 1, 6, 6), dtype=torch.uint8)
    out = adapt_to_shape(_set(gray), (3, 6, 6))
    assert out.shape == (3, 6, 6) and out.images.dtype == torch.uint8
    assert torch.equal(out.images, gray.expand(-1, 3, -1, -1))
    assert out.adaptation == "gray->RGB (replicate channel)"


def test_adapt_rgb_to_gray_luminance():
    rgb = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    out = adapt_to_shape(_set(rgb), (1, 2, 2))
    # 0.299*200 + 0.587*100 + 0.114*50 = 59.8 + 58.7 + 5.7 = 124.2 -> 124
    assert out.images.flatten().tolist() == [124] * 4
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert adapt_to_shape(_set(white), (1, 1, 1)).images.item() == 255
    assert "BT.601" in out.adaptation


def test_adapt_resize_and_combined():
    img = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    out = adapt_to_shape(_set(img), (3, 28, 28))
    assert out.images.shape == (2, 3, 28, 28) and out.images.is_contiguous()
    assert out.adaptation == ("gray->RGB (replicate channel); "
                              "32x32->28x28 (bilinear resize, antialias)")
    flat = torch.full((1, 1, 32, 32), 77, dtype=torch.uint8)
    assert adapt_to_shape(_set(flat), (1, 28, 28)).images.unique().tolist() == [77]


def test_adapt_other_channel_mismatch_is_user_error():
    with pytest.raises(UserError, match="only 1<->3"):
        adapt_to_shape(_set(torch.zeros(1, 4, 2, 2, dtype=torch.uint8)), (3, 2, 2))


# --- preprocess: dequantization and bits per dim -------------------------------------


def test_dequantize_range_and_bins():
    k = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(50, 3, 1, 1)
    x = dequantize(k, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == k.shape
    assert x.min() >= 0 and x.max() < 1
    assert torch.equal(torch.floor(x * 256).to(torch.uint8), k)


def test_dequantize_top_bin_never_reaches_one():
    k = torch.tensor([0.0, 254.0, 255.0])
    u = torch.full((3,), 1 - 2.0**-24)  # the largest u torch.rand can return
    x = _place(k, u)
    assert (x < 1).all() and torch.equal(torch.floor(x * 256), k)


def test_dequantize_is_seeded():
    k = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    a = dequantize(k, torch.Generator().manual_seed(1))
    assert torch.equal(a, dequantize(k, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, dequantize(k, torch.Generator().manual_seed(2)))


def test_bits_per_dim_formula():
    d = 784
    assert bits_per_dim(0.0, d) == pytest.approx(8.0, abs=1e-12)  # uniform density: 8 bits
    log_px = 1000.0
    expected = -(log_px - d * math.log(256)) / (d * math.log(2))
    assert bits_per_dim(log_px, d) == pytest.approx(expected, rel=1e-12)
    assert bits_per_dim(d * math.log(2), d) == pytest.approx(7.0)  # one bit per dim gained
    np_out = bits_per_dim(np.array([0.0, log_px]), d)
    assert isinstance(np_out, np.ndarray) and np.allclose(np_out, [8.0, expected])
    t_out = bits_per_dim(torch.tensor([0.0, log_px], dtype=torch.float64), d)
    assert isinstance(t_out, torch.Tensor) and torch.allclose(
        t_out, torch.tensor([8.0, expected], dtype=torch.float64))
    assert discrete_log_likelihood_bound(0.0, d) == pytest.approx(-d * math.log(256))
    with pytest.raises(ValueError):
        bits_per_dim(0.0, 0)
