"""Shared fixtures: tiny image sets in user-file form and a tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REAL_DATA = os.environ.get("OOD_AUDIT_DATA")


def blobs(n: int, size: int = 8, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Structured uint8 images [N, H, W(, C)]: a bright blob on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(2, size - 2, 2)
        img = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0) + rng.normal(20, 8, (size, size))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    if channels == 3:
        out = np.repeat(out[..., None], 3, axis=-1)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A .npy of 256 8x8 gray images, usable as --data."""
    path = tmp_path_factory.mktemp("data") / "blobs.npy"
    np.save(path, blobs(256))
    return path


@pytest.fixture(scope="session")
def tiny_ood(tmp_path_factory) -> Path:
    """A .npy OOD set of another kind: flat gray images with faint noise."""
    path = tmp_path_factory.mktemp("ood") / "flat.npy"
    rng = np.random.default_rng(1)
    np.save(path, np.clip(rng.normal(128, 3, (96, 8, 8)), 0, 255).astype(np.uint8))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A glow `tiny` run trained for 2 short epochs on ``tiny_data`` (shared, read-only)."""
    from ood_audit.config import RunConfig, TrainConfig
    from ood_audit.training.run import train_run

    root = tmp_path_factory.mktemp("runs")
    cfg = RunConfig(model="glow", preset="tiny", data=str(tiny_data),
                    train=TrainConfig(epochs=2, batch_size=32, limit=128, test_limit=64,
                                      warmup_steps=5, device="cpu"))
    outcome = train_run(cfg, root / "run", runs_root=root, log=lambda m: None)
    return outcome.run_dir


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run the console-script entry in-process: (exit code, stdout, stderr)."""
    from ood_audit.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    """The test's own folder as the working directory (runs/latest lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def one_thread():
    """Tiny tensors: one thread is faster, and immune to oversubscribed CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob_images(n: int, channels: int, size: int = 8, seed: int = 0):
    """uint8 blobs as [N, C, H, W] and their dequantized x (float64)."""
    k = torch.from_numpy(blobs(n, size=size, seed=seed, channels=channels))
    k = k.permute(0, 3, 1, 2) if channels == 3 else k[:, None]
    g = torch.Generator().manual_seed(seed)
    return k, (k.double() + torch.rand(k.shape, generator=g, dtype=torch.float64)) / 256

