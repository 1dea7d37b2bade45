"""``ood-audit fetch`` and ``make demo`` on a machine without the data: the sets are
downloaded by torchvision's own code into the data root (the network is faked: a fake
server hands out gzipped IDX files, which torchvision's real extractor unpacks), and a
failed download is one line naming the URLs to fetch by hand and the folder (exit 2)."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist as tv_mnist
from torchvision.datasets.utils import extract_archive

from ood_audit.cli.app import main
from ood_audit.data import load_dataset
from ood_audit.data.fetch import fetch_dataset
from ood_audit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
N = {"train": 5, "t10k": 3}


def idx_bytes(stem: str, seed: int) -> bytes:
    """The IDX file ``stem`` (e.g. ``t10k-images-idx3-ubyte``) as torchvision's reader wants it."""
    prefix = stem.split("-")[0]
    rng = np.random.default_rng(seed + len(prefix))
    n = N[prefix]
    if "images" in stem:
        return struct.pack(">iiii", 2051, n, 28, 28) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
    return struct.pack(">ii", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()


class FakeServer:
    """Stands in for ``download_and_extract_archive``: 'downloads' URL as a .gz file into
    download_root and extracts it with torchvision's real ``extract_archive``."""

    def __init__(self, offline: bool = False):
        self.offline, self.urls = offline, []

    def __call__(self, url, download_root, extract_root=None, filename=None, md5=None,
                 remove_finished=False):
        self.urls.append(url)
        if self.offline:
            raise URLError("[Errno -2] Name or service not known")
        archive = Path(download_root) / (filename or url.rsplit("/", 1)[1])
        archive.write_bytes(gzip.compress(idx_bytes(archive.name.removesuffix(".gz"), seed=len(url))))
        extract_archive(str(archive), str(extract_root or download_root), remove_finished)


@pytest.fixture()
def server(monkeypatch):
    fake = FakeServer()
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake)
    return fake


@pytest.fixture()
def offline(monkeypatch):
    fake = FakeServer(offline=True)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake)
    return fake


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.mark.parametrize("name,cls", [("fashionmnist", tv_mnist.FashionMNIST), ("mnist", tv_mnist.MNIST)])
def test_fetch_downloads_missing_set_in_torchvision_layout(tmp_path, server, name, cls):
    done = fetch_dataset(name, tmp_path)
    assert (done.name, done.status, done.root) == (name, "downloaded", tmp_path)
    raw = tmp_path / cls.__name__ / "raw"
    for filename, _ in cls.resources:  # every archive fetched from the class's own mirror
        assert cls.mirrors[0] + filename in server.urls
        assert (raw / filename.removesuffix(".gz")).is_file()
    # what was fetched is what every command then reads
    test = load_dataset(name, "test", root=tmp_path)
    url = cls.mirrors[0] + "t10k-images-idx3-ubyte.gz"
    expected = np.frombuffer(idx_bytes("t10k-images-idx3-ubyte", seed=len(url))[16:], np.uint8)
    assert test.images.shape == (3, 1, 28, 28)
    assert torch.equal(test.images.flatten(), torch.from_numpy(expected.copy()))
    assert len(load_dataset(name, "train", root=tmp_path)) == 5
    # a second fetch finds it and does not touch the network
    calls = len(server.urls)
    assert fetch_dataset(name, tmp_path).status == "present"
    assert len(server.urls) == calls


def test_cli_fetch_uses_OOD_AUDIT_DATA_and_reports_each_set(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("OOD_AUDIT_DATA", str(tmp_path))
    code, out, err = run(["fetch", "fashionmnist", "mnist", "noise-uniform"], capsys)
    assert code == 0, err
    assert f"fashionmnist: downloaded in {tmp_path}" in out and f"mnist: downloaded in {tmp_path}" in out
    assert "noise-uniform: generated on demand" in out
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    code, out, _ = run(["fetch", "fashionmnist", "mnist"], capsys)
    assert code == 0 and out.count("present in") == 2


def test_cli_fetch_defaults_to_the_cache_root(tmp_path, server, monkeypatch, capsys):
    monkeypatch.delenv("OOD_AUDIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, err = run(["fetch", "mnist"], capsys)
    assert code == 0, err
    assert (tmp_path / "cache" / "ood-audit" / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()


@pytest.mark.parametrize("name,cls", [("fashionmnist", tv_mnist.FashionMNIST), ("mnist", tv_mnist.MNIST)])
def test_failed_download_is_one_line_naming_urls_and_folder(tmp_path, offline, monkeypatch, capsys,
                                                             name, cls):
    monkeypatch.setenv("OOD_AUDIT_DATA", str(tmp_path))
    code, out, err = run(["fetch", name], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    raw = tmp_path / cls.__name__ / "raw"
    assert line.startswith(f"error: could not download {cls.__name__} into {raw} (")
    assert "Name or service not known" in line  # the cause
    assert f"by hand and gunzip them into {raw}" in line  # the target folder
    # the URLs, as one shell brace list: mirror + {stem,...}.gz expands to each archive
    brace = line.split("fetch ", 1)[1].split(" ", 1)[0]
    head, rest = brace.split("{")
    stems, tail = rest.split("}")
    assert head == cls.mirrors[0] and tail == ".gz"
    assert [head + s + tail for s in stems.split(",")] == [cls.mirrors[0] + f for f, _ in cls.resources]


def test_fetch_of_a_damaged_set_says_which_file(tmp_path, server):
    fetch_dataset("mnist", tmp_path)
    f = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        fetch_dataset("mnist", tmp_path)
    assert "\n" not in str(err.value)


def test_fetch_unknown_name_is_one_line(capsys):
    code, _, err = run(["fetch", "fashion-mnist"], capsys)
    assert code == 2 and "unknown data set 'fashion-mnist'" in err and "fashionmnist" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_set_points_at_fetch(tmp_path):
    with pytest.raises(UserError, match="ood-audit fetch fashionmnist"):
        load_dataset("fashionmnist", root=tmp_path)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_fetches_before_training(tmp_path):
    """`make demo` runs `ood-audit fetch fashionmnist mnist` before anything else, and
    keeps OOD_AUDIT_DATA (a set one wins; ../shared/data when it exists)."""
    venv = tmp_path / "venv"
    dry = subprocess.run(["make", "-n", "demo", f"VENV={venv}", "-o", f"{venv}/.installed",
                          "OOD_AUDIT_DATA=/some/data"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    steps = [line.split("#")[0].strip() for line in dry.stdout.splitlines() if "ood_audit" in line]
    assert steps[0] == f"{venv}/bin/python -m ood_audit fetch fashionmnist mnist"
    assert [s.split()[3] for s in steps[1:]] == ["train", "score", "decompose", "report"]
    assert "ood_audit report" in steps[-1]

    def data_setting(*extra: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "OOD_AUDIT_DATA"}
        printed = subprocess.run(["make", "-n", "-p", "demo", f"VENV={venv}", "-o", f"{venv}/.installed",
                                  *extra], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=60).stdout
        return [line for line in printed.splitlines() if line.startswith("OOD_AUDIT_DATA ")]

    assert data_setting("OOD_AUDIT_DATA=/some/data") == ["OOD_AUDIT_DATA = /some/data"]
    [default] = data_setting()
    assert "$(wildcard ../shared/data)" in default and "$(abspath ../shared/data)" in default
