"""DDP under torchrun (gloo, CPU, 2 processes) follows the one-process trajectory.

Tolerance: the global batch, its images and its noise are those of one process; only the
float reduction order differs (two half-batch sums all-reduced vs one sum), so losses and
weights agree to rtol 1e-4 / atol 1e-5 after 8 Adam steps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from ood_audit.checkpoint import load_checkpoint
from ood_audit.config import RunConfig, TrainConfig
from ood_audit.distributed import DistContext
from ood_audit.errors import UserError
from ood_audit.runs import RunDir
from ood_audit.training.ddp import rank_slice
from ood_audit.training.run import train_run

# 97 images, global batch 32: three full batches (16 + 16 per rank) and a ragged last
# batch of 1 image, so rank 1's slice of it is empty (weighted, not dropped).
TRAIN = dict(epochs=2, batch_size=32, limit=97, test_limit=40, warmup_steps=2, lr=3e-3,
             device="cpu")


#: What DDP prints when a gradient's strides differ from its bucket view's.
STRIDE_WARNING = "Grad strides do not match bucket view strides"


def _config(data) -> RunConfig:
    return RunConfig(model="glow", preset="tiny", data=str(data),
                     model_config={"levels": 2, "steps": 2, "hidden": 8}, train=TrainConfig(**TRAIN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cwd, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "ood_audit", "train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_same_weights(path_a, path_b) -> None:
    a, _ = load_checkpoint(path_a)
    b, _ = load_checkpoint(path_b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)


def test_two_ranks_follow_one_process_and_resume(tiny_data, tmp_path):
    one = train_run(_config(tiny_data), tmp_path / "one", runs_root=tmp_path, log=lambda m: None)
    ref = RunDir(one.run_dir)
    # the 2 epochs under DDP are run as 1, then --resume to 2: also the resume test
    cfg_file = tmp_path / "ddp.yaml"
    cfg = _config(tiny_data)
    cfg.train.epochs = 1
    import dataclasses

    cfg_file.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    ddp = RunDir(tmp_path / "ddp")
    first = _torchrun(tmp_path, "--config", str(cfg_file), "--out", str(ddp.root))
    assert "effective batch 32 = 2 ranks x 16" in first.stderr
    assert STRIDE_WARNING not in first.stderr  # kernels laid out like the activations
    assert first.stdout.count("trained glow") == 1, first.stdout  # rank 1 stays quiet
    _assert_same_weights(ddp.epoch_checkpoint(1), ref.epoch_checkpoint(1))
    resumed = _torchrun(tmp_path, "--resume", "--epochs", "2", "--out", str(ddp.root))
    assert STRIDE_WARNING not in resumed.stderr
    _assert_same_weights(ddp.model, ref.model)
    got, want = pd.read_parquet(ddp.metrics), pd.read_parquet(ref.metrics)
    assert got["step"].tolist() == want["step"].tolist() == [4, 8]
    for col in ("train_bpd", "test_bpd"):  # the per-epoch loss trajectory
        assert got[col].tolist() == pytest.approx(want[col].tolist(), rel=1e-4), col
    assert want["train_bpd"].iloc[1] < want["train_bpd"].iloc[0] - 1e-3  # it did learn
    assert not list(ddp.root.glob(".*.tmp"))


@pytest.mark.parametrize("n", [0, 1, 5, 16, 33])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_slices_tile_the_batch_like_tensor_split(n, world):
    items = torch.arange(n)
    parts = [items[rank_slice(n, world, r)] for r in range(world)]
    assert [p.tolist() for p in parts] == [p.tolist() for p in torch.tensor_split(items, world)]


def test_batch_not_divisible_by_ranks_is_a_user_error(tiny_data, tmp_path):
    from ood_audit.data import load_dataset
    from ood_audit.models.registry import build_model, resolve_model_config
    from ood_audit.training.trainer import Trainer

    cfg = _config(tiny_data)
    cfg.train.batch_size = 33
    data = load_dataset(cfg.data, "train", limit=40)
    mc, _ = resolve_model_config("glow", "tiny", cfg.model_config, data.shape)
    model = build_model("glow", mc, data.shape)
    with pytest.raises(UserError, match="global batch and must be divisible by the 2 ranks"):
        Trainer(model, "glow", mc, cfg, RunDir(tmp_path / "r"), data, data, torch.device("cpu"),
                dist=DistContext(rank=0, world=2))
