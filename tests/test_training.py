"""The trainer: learning happens, checkpoints and metrics are written, resume is exact."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
import yaml

from ood_audit.checkpoint import load_checkpoint, read_metadata
from ood_audit.config import RunConfig, TrainConfig, from_dict
from ood_audit.errors import UserError
from ood_audit.runs import RunDir
from ood_audit.training.run import train_run


def _cfg(data, **train):
    base = dict(epochs=2, batch_size=32, limit=96, test_limit=32, warmup_steps=2, device="cpu")
    base.update(train)
    return RunConfig(model="glow", preset="tiny", data=str(data), train=TrainConfig(**base))


def test_run_directory_contents(tiny_run):
    rd = RunDir(tiny_run)
    assert rd.model.exists() and rd.config.exists() and rd.train_state.exists()
    assert [p.name for p in rd.epoch_checkpoints()] == ["epoch-0001.safetensors",
                                                        "epoch-0002.safetensors"]
    meta = read_metadata(rd.model)
    assert meta["epoch"] == "2" and meta["model"] == "glow"
    assert "dequantization" in meta["preprocessing"]
    history = pd.read_parquet(rd.metrics)
    assert history["epoch"].tolist() == [1, 2]
    assert {"train_bpd", "test_bpd", "images_per_s", "nan_skips"} <= set(history.columns)
    cfg = from_dict(RunConfig, yaml.safe_load(rd.config.read_text()), "config.yaml")
    assert cfg.preset == "tiny"


def test_training_lowers_bits_per_dim(tiny_data, tmp_path):
    out = train_run(_cfg(tiny_data, epochs=3, lr=3e-3, limit=128, test_limit=64),
                    tmp_path / "r", runs_root=tmp_path, log=lambda m: None)
    bpds = [r.test_bpd for r in out.results]
    assert bpds[-1] < bpds[0] - 0.05, bpds


def test_resume_continues_the_same_trajectory(tiny_data, tmp_path):
    full = train_run(_cfg(tiny_data, epochs=2), tmp_path / "full", runs_root=tmp_path,
                     log=lambda m: None)
    train_run(_cfg(tiny_data, epochs=1), tmp_path / "half", runs_root=tmp_path,
              log=lambda m: None)
    resumed = train_run(_cfg(tiny_data), tmp_path / "half", resume=True, resume_epochs=2,
                        runs_root=tmp_path, log=lambda m: None)
    assert resumed.results[-1].epoch == 2
    a, _ = load_checkpoint(RunDir(full.run_dir).model)
    b, _ = load_checkpoint(RunDir(resumed.run_dir).model)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=ka)


def test_existing_run_is_not_overwritten(tiny_run, tiny_data):
    with pytest.raises(UserError, match="already holds a run"):
        train_run(_cfg(tiny_data), tiny_run, log=lambda m: None)


def test_resume_without_state_is_a_user_error(tmp_path, tiny_data):
    with pytest.raises(UserError, match="nothing to resume"):
        train_run(_cfg(tiny_data), tmp_path / "nothing", resume=True, log=lambda m: None)


def test_nan_guard_stops_with_advice(tiny_data, tmp_path, monkeypatch):
    from ood_audit.models.glow import Glow

    monkeypatch.setattr(Glow, "training_loss",
                        lambda self, x: torch.full((len(x),), float("nan"), requires_grad=True))
    with pytest.raises(UserError, match="diverged.*lower --lr"):
        train_run(_cfg(tiny_data, max_bad_steps=2), tmp_path / "nan", runs_root=tmp_path,
                  log=lambda m: None)


def test_unknown_model_and_preset_are_user_errors(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    cfg.model = "nope"
    with pytest.raises(UserError, match="unknown model 'nope'.*glow"):
        train_run(cfg, tmp_path / "a", runs_root=tmp_path, log=lambda m: None)
    cfg = _cfg(tiny_data)
    cfg.preset = "huge"
    with pytest.raises(UserError, match="no preset 'huge'"):
        train_run(cfg, tmp_path / "b", runs_root=tmp_path, log=lambda m: None)


def test_glow_cv_refuses_affine_override(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    with pytest.raises(UserError, match="fixes coupling='additive'"):  # checked as the config is made
        cfg = dataclasses.replace(cfg, model="glow-cv", model_config={"coupling": "affine"})
        train_run(cfg, tmp_path / "c", runs_root=tmp_path, log=lambda m: None)


def test_loss_scale_and_clip_norm_are_recorded(tiny_run):
    rd = RunDir(tiny_run)
    cfg = yaml.safe_load(rd.config.read_text())["train"]
    assert cfg["loss_scale"] == "bits_per_dim" and cfg["max_grad_norm"] == 50.0
    meta = read_metadata(rd.model)
    assert meta["train.loss_scale"] == "bits_per_dim" and float(meta["train.max_grad_norm"]) == 50.0
    history = pd.read_parquet(rd.metrics)
    assert history["clipped_frac"].between(0, 1).all()


def test_a_healthy_run_clips_few_steps_and_the_old_scale_clipped_most(tiny_data, tmp_path):
    """The clip norm means the same on every image size only on the bits/dim scale: the
    default run clips a minority of its steps; the same run on the nats scale (ood-audit
    0.1's) clips nearly all of them, the bug this guards against."""
    def clipped(scale: str) -> list[float]:
        out = train_run(_cfg(tiny_data, epochs=2, lr=3e-3, limit=128, loss_scale=scale),
                        tmp_path / scale, runs_root=tmp_path, log=lambda m: None)
        return [r.clipped_frac for r in out.results]

    assert max(clipped("bits_per_dim")) < 0.5
    assert min(clipped("nats_per_image")) > 0.5


def test_polyak_average_is_what_is_evaluated_checkpointed_and_resumed(tiny_data, tmp_path):
    full = train_run(_cfg(tiny_data, ema_decay=0.9), tmp_path / "full", runs_root=tmp_path,
                     log=lambda m: None)
    plain = train_run(_cfg(tiny_data), tmp_path / "plain", runs_root=tmp_path, log=lambda m: None)
    assert full.results[-1].test_bpd != plain.results[-1].test_bpd
    train_run(_cfg(tiny_data, epochs=1, ema_decay=0.9), tmp_path / "half", runs_root=tmp_path,
              log=lambda m: None)
    resumed = train_run(_cfg(tiny_data), tmp_path / "half", resume=True, resume_epochs=2,
                        runs_root=tmp_path, log=lambda m: None)
    a, _ = load_checkpoint(RunDir(full.run_dir).model)
    b, _ = load_checkpoint(RunDir(resumed.run_dir).model)
    for (ka, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=ka)
    # the checkpoint holds the average, not the last iterate the optimizer state holds
    state = torch.load(RunDir(full.run_dir).train_state, weights_only=True)
    raw = state["model"]
    assert any(not torch.equal(raw[k], v) for k, v in a.state_dict().items() if v.is_floating_point())


def test_a_run_from_before_the_loss_scale_resumes_on_its_own_scale(tiny_data, tmp_path):
    train_run(_cfg(tiny_data, epochs=1), tmp_path / "old", runs_root=tmp_path, log=lambda m: None)
    path = RunDir(tmp_path / "old").config
    data = yaml.safe_load(path.read_text())
    del data["train"]["loss_scale"]  # as ood-audit 0.1 wrote it
    path.write_text(yaml.safe_dump(data))
    out = train_run(None, tmp_path / "old", resume=True, resume_epochs=2, runs_root=tmp_path,
                    log=lambda m: None)
    assert out.config.train.loss_scale == "nats_per_image"
