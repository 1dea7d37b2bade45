"""``train --seeds``: one run per seed, ensemble.json, resume of unfinished members."""

from __future__ import annotations

import json

import pytest
import torch

from ood_audit.checkpoint import load_checkpoint
from ood_audit.cli.app import main
from ood_audit.config import RunConfig, TrainConfig
from ood_audit.errors import UserError
from ood_audit.runs import RunDir
from ood_audit.training import ensemble as ens
from ood_audit.training.run import train_run


def _cfg(data) -> RunConfig:
    return RunConfig(model="glow", preset="tiny", data=str(data),
                     train=TrainConfig(epochs=1, batch_size=32, limit=64, test_limit=32,
                                       warmup_steps=2, lr=3e-3, device="cpu"))


def _weights(run) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(RunDir(run).model)
    return model.state_dict()


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_seeds_train_one_run_each_equal_to_separate_runs(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["train", "--model", "glow", "--preset", "tiny", "--data", str(tiny_data),
                           "--epochs", "1", "--limit", "64", "--batch-size", "32", "--device", "cpu",
                           "--seeds", "0,1", "--out", "ens"], capsys)
    assert code == 0, err
    assert "ensemble of 2" in out and "score ens --ood mnist" in out
    manifest = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert manifest["members"] == ["seed-0", "seed-1"] and manifest["seeds"] == [0, 1]
    assert manifest["training"] is None
    w0, w1 = _weights(tmp_path / "ens/seed-0"), _weights(tmp_path / "ens/seed-1")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # the seeds made different models
    code, _, err = _cli(["train", "--model", "glow", "--preset", "tiny", "--data", str(tiny_data),
                         "--epochs", "1", "--limit", "64", "--batch-size", "32", "--device", "cpu",
                         "--seed", "1", "--out", "single"], capsys)
    assert code == 0, err
    single = _weights(tmp_path / "single")
    for k in single:  # the member is exactly the separate `train --seed 1` run
        assert torch.equal(single[k], w1[k]), k



def test_resume_finishes_the_unfinished_members(tiny_data, tmp_path, monkeypatch):
    real = ens.train_run

    def stop_on_seed_1(cfg, out, **kw):
        if cfg is not None and cfg.train.seed == 1:
            raise UserError("stopped by SIGINT")  # as Ctrl-C before seed-1's first epoch
        return real(cfg, out, **kw)

    monkeypatch.setattr(ens, "train_run", stop_on_seed_1)
    root = tmp_path / "ens"
    with pytest.raises(UserError, match="SIGINT"):
        ens.train_ensemble(_cfg(tiny_data), root, [0, 1], runs_root=tmp_path, log=lambda m: None)
    partial = json.loads((root / "ensemble.json").read_text())
    assert partial == {"members": ["seed-0"], "seeds": [0], "planned_seeds": [0, 1],
                       "training": "seed-1"}
    monkeypatch.setattr(ens, "train_run", real)
    first = (root / "seed-0/model.safetensors").stat().st_mtime_ns
    outcomes = ens.train_ensemble(None, root, None, resume=True, runs_root=tmp_path,
                                  log=lambda m: None)
    assert [o.results for o in outcomes][0] == []  # seed-0 was finished: not retrained
    assert (root / "seed-0/model.safetensors").stat().st_mtime_ns == first
    assert outcomes[1].config.train.seed == 1 and len(outcomes[1].results) == 1
    done = json.loads((root / "ensemble.json").read_text())
    assert done["members"] == ["seed-0", "seed-1"] and done["training"] is None
    assert (tmp_path / "latest").read_text().strip() == str((root / "seed-0").resolve())
    cfg = _cfg(tiny_data)
    cfg.train.seed = 1
    separate = train_run(cfg, tmp_path / "sep", runs_root=tmp_path, log=lambda m: None)
    w, s = _weights(root / "seed-1"), _weights(separate.run_dir)
    assert all(torch.equal(w[k], s[k]) for k in w)
    with pytest.raises(UserError, match="already holds an ensemble"):
        ens.train_ensemble(_cfg(tiny_data), root, [0, 1], runs_root=tmp_path, log=lambda m: None)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,1", "--seed", "3"], "--seeds and --seed conflict"),
    (["--seeds", "0,x"], "integers"),
    (["--seeds", "2,2"], "repeats seed 2"),
])
def test_bad_seeds_are_one_line_user_errors(argv, message, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(["train", "--data", str(tiny_data), "--preset", "tiny", *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
