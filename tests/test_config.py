"""Config loading: unknown keys and wrong types are named, presets resolve."""

from __future__ import annotations

import pytest

from ood_audit.config import RunConfig, TrainConfig, from_dict, keep_every, load_yaml
from ood_audit.errors import UserError
from ood_audit.models.registry import resolve_model_config


def test_yaml_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: glow-cv\ntrain:\n  epochs: 3\n  lr: 1e-3\n")
    cfg = from_dict(RunConfig, load_yaml(p), str(p))
    assert cfg.model == "glow-cv" and cfg.train.epochs == 3 and cfg.train.lr == 0.001


@pytest.mark.parametrize("data, match", [
    ({"modle": "glow"}, "unknown key.*'modle'"),
    ({"train": {"epocs": 1}}, "train: unknown key.*'epocs'"),
    ({"train": {"epochs": "two"}}, "train: epochs: expected an integer"),
    ({"train": {"epochs": 0}}, "epochs must be positive"),
    ({"train": {"batch_size": -4}}, "batch_size must be positive"),
    ({"train": {"keep_checkpoints": "some"}}, "keep_checkpoints"),
    ({"train": 5}, "expected a mapping"),
])
def test_bad_config_is_named(data, match):
    with pytest.raises(UserError, match=match):
        from_dict(RunConfig, data, "f.yaml")


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(p)
    with pytest.raises(UserError, match="cannot read config"):
        load_yaml(tmp_path / "missing.yaml")


def test_keep_every():
    assert keep_every("all") == 1 and keep_every("last") is None and keep_every("every:5") == 5
    with pytest.raises(UserError):
        keep_every("every:0")


def test_presets_and_level_cap():
    cfg, notes = resolve_model_config("glow", "paper", {}, (1, 28, 28))
    assert (cfg.levels, cfg.steps, cfg.hidden) == (2, 32, 512)  # 28x28 allows two squeezes
    assert notes and "levels" in notes[0]
    cfg, notes = resolve_model_config("glow", "paper", {}, (3, 32, 32))
    assert (cfg.levels, cfg.steps, cfg.hidden, cfg.coupling) == (3, 32, 512, "affine")
    assert notes == []
    cfg, _ = resolve_model_config("glow-cv", "small", {"hidden": 8}, (1, 28, 28))
    assert cfg.coupling == "additive" and cfg.hidden == 8
    with pytest.raises(UserError, match="unknown key"):
        resolve_model_config("glow", "small", {"hiden": 8}, (1, 28, 28))


def test_train_config_defaults_are_valid():
    TrainConfig()
