"""End to end on a few hundred real FashionMNIST and MNIST images (needs OOD_AUDIT_DATA).

Skipped, visibly, when the data root is not set or lacks the files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = os.environ.get("OOD_AUDIT_DATA")
HAVE = bool(ROOT) and all(
    (Path(ROOT) / name / "raw" / "t10k-images-idx3-ubyte").exists()
    for name in ("MNIST", "FashionMNIST")
)
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not HAVE, reason="OOD_AUDIT_DATA not set or without MNIST/FashionMNIST"),
]


def test_train_and_score_real_fashionmnist_vs_mnist(tmp_path, monkeypatch):
    from ood_audit.cli.app import main
    from ood_audit.scoring.parquet import read_scores

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "glow", "--data", "fashionmnist", "--preset", "tiny",
              "--epochs", "1", "--limit", "512", "--batch-size", "64", "--device", "cpu",
              "--out", "runs/real"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["score", "--ood", "mnist", "--ood", "noise-uniform", "--limit", "300",
              "--train-limit", "200"])
    assert exc.value.code == 0
    df, meta = read_scores(tmp_path / "runs/real/scores")
    assert meta.in_dataset == "fashionmnist"
    counts = df.groupby(["dataset", "split"]).size()
    assert counts[("fashionmnist", "test")] == 300 and counts[("mnist", "test")] == 300
    assert (df["n_dims"] == 784).all()  # the data's own 28x28 pixels: no padding
    means = df.groupby("dataset")["bpd"].mean()
    # Uniform noise is far less likely than either image set even after a short training.
    assert means["noise-uniform"] > means["fashionmnist"] + 0.5
    assert means["noise-uniform"] > means["mnist"] + 0.5
