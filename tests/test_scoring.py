"""The scorer and its Parquet: terms sum to log_px, bpd formula, round trips, invariance."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ood_audit.checkpoint import load_checkpoint, save_checkpoint
from ood_audit.commands.score import score_run
from ood_audit.data import load_dataset
from ood_audit.errors import UserError
from ood_audit.runs import RunDir
from ood_audit.scoring.batches import score_images
from ood_audit.scoring.jobs import ScoreJob
from ood_audit.scoring.parquet import read_scores
from ood_audit.scoring.scorer import score_jobs


@pytest.fixture(scope="module")
def scored(tiny_run, tiny_ood, tmp_path_factory):
    rd = RunDir(tiny_run)
    out = tmp_path_factory.mktemp("scored") / "scores"
    model, info = load_checkpoint(rd.model)
    from ood_audit.scoring.jobs import build_jobs

    jobs = build_jobs(info, [str(tiny_ood), "noise-uniform"], root=None, download=False,
                      limit=80, train_limit=40, seed=0, notify=lambda m: None)
    summaries = score_jobs(model, info, jobs, out, batch_size=16, device=torch.device("cpu"),
                           seed=0)
    df, meta = read_scores(out)
    return df, meta, summaries, model


def test_terms_sum_to_log_px(scored):
    df, meta, _, _ = scored
    assert meta.terms, "the model named no terms"
    total = df[meta.terms].sum(axis=1).to_numpy()
    np.testing.assert_allclose(total, df["log_px"].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(df[[t for t in meta.terms if t.startswith("log_pz")]].sum(axis=1),
                               df["log_pz"], atol=1e-6)
    np.testing.assert_allclose(df["log_pz"] + df["logdet"], df["log_px"], atol=1e-6)


def test_bpd_follows_from_log_px(scored):
    df, *_ = scored
    d = df["n_dims"].to_numpy()
    expected = -(df["log_px"].to_numpy() - d * math.log(256)) / (d * math.log(2))
    np.testing.assert_allclose(df["bpd"].to_numpy(), expected, rtol=1e-12)
    assert (df["n_dims"] == 64).all()  # 1x8x8: the data's own pixels, no padding


def test_rows_roles_and_metadata(scored, tiny_ood):
    df, meta, summaries, _ = scored
    counts = df.groupby(["dataset", "split", "role"]).size().to_dict()
    in_name = meta.in_dataset
    assert counts[(in_name, "test", "in")] == 80
    assert counts[(in_name, "train", "in")] == 40
    assert counts[(str(tiny_ood), "test", "ood")] == 80
    assert counts[("noise-uniform", "test", "ood")] == 80
    assert set(df["transform"]) == {"none"}
    assert len(meta.checkpoint_sha256) == 64
    assert meta.run_config["model"] == "glow"
    # indices are positions in each set, labels -1 for unlabeled user data
    sub = df[df.dataset == "noise-uniform"]
    assert sub["index"].tolist() == list(range(80))
    assert (sub["label"] == -1).all()
    # the printed summary agrees with the table
    s = next(s for s in summaries if s.dataset == "noise-uniform")
    assert s.means["bpd"] == pytest.approx(sub["bpd"].mean())


def test_noise_is_unlikely(scored):
    df, *_ = scored
    means = df.groupby("dataset")["bpd"].mean()
    assert means["noise-uniform"] > means.drop("noise-uniform").max()


def test_scores_do_not_depend_on_batch_size(scored, tiny_run):
    _, info = load_checkpoint(RunDir(tiny_run).model)
    model = scored[3]
    job = ScoreJob(load_dataset("noise-uniform", "test", limit=50, shape=info.input_shape), "ood")
    a = np.concatenate([c["log_px"] for c in score_images(model, job, 7, torch.device("cpu"), 3)])
    b = np.concatenate([c["log_px"] for c in score_images(model, job, 50, torch.device("cpu"), 3)])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    c = np.concatenate([c["log_px"] for c in score_images(model, job, 50, torch.device("cpu"), 4)])
    assert not np.allclose(a, c)  # another seed, other noise


def test_checkpoint_round_trip_scores_identically(tiny_run, tmp_path):
    model, info = load_checkpoint(RunDir(tiny_run).model)
    path = tmp_path / "copy.safetensors"
    save_checkpoint(path, model, model_name=info.model, model_config=info.model_config,
                    run_config=info.run_config, dataset=info.dataset, epoch=info.epoch)
    again, info2 = load_checkpoint(path)
    x = torch.rand(16, *info.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), again.log_prob(x), rtol=0, atol=0)
    assert info2.epoch == info.epoch and info2.model_config == info.model_config


def test_actnorm_not_reinitialised_after_reload(tiny_run):
    model, _ = load_checkpoint(RunDir(tiny_run).model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.train()
        model.log_prob(torch.rand(8, *model.input_shape) * 0.1)  # a very different batch
    after = model.state_dict()
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0, msg=k)


def test_truncated_checkpoint_is_a_user_error(tiny_run, tmp_path):
    data = RunDir(tiny_run).model.read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors"):
        load_checkpoint(bad)


def test_scores_reader_rejects_truncated_and_foreign(scored, tmp_path, tiny_run):
    path = tmp_path / "scores.parquet"
    score_run(RunDir(tiny_run), ["noise-uniform"], limit=10, train_limit=0)
    good = (RunDir(tiny_run).scores / "part-0.parquet").read_bytes()
    path.write_bytes(good[:200])
    with pytest.raises(UserError, match="not a readable Parquet"):
        read_scores(path)
    import pandas as pd

    pd.DataFrame({"a": [1]}).to_parquet(path)
    with pytest.raises(UserError, match="not written by ood-audit"):
        read_scores(path)
    table = pq.read_table(RunDir(tiny_run).scores)
    pq.write_table(table.drop(["log_pz_level0"]), path)
    with pytest.raises(UserError, match="lacks column"):
        read_scores(path)


def test_ood_equal_to_training_set_is_refused(tiny_run, tiny_data):
    with pytest.raises(UserError, match="own training set"):
        score_run(RunDir(tiny_run), [str(tiny_data)], limit=10)
