"""Ensembles: the log-mean-exp, an ensemble folder scored end to end, the report's table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import roc_auc_score

from ood_audit.analysis.tables import load_run_scores
from ood_audit.checkpoint import load_checkpoint
from ood_audit.errors import UserError
from ood_audit.report.build import build_report
from ood_audit.runs import RunDir, resolve_run
from ood_audit.scoring.batches import score_images
from ood_audit.scoring.companions import log_mean_exp
from ood_audit.scoring.jobs import ScoreJob

# ---------------------------------------------------------------- log-mean-exp

finite = st.floats(-800, 50, allow_nan=False)


@given(arrays(np.float64, st.integers(1, 20), elements=finite))
def test_one_member_is_that_member(v):
    np.testing.assert_array_equal(log_mean_exp(v[None, :]), v)


@settings(max_examples=50)
@given(st.integers(2, 6).flatmap(
    lambda m: arrays(np.float64, (m, 7), elements=st.floats(-300, 30, allow_nan=False))))
def test_many_members_against_brute_force(v):
    brute = np.log(np.mean(np.exp(v), axis=0))  # no underflow in this range
    np.testing.assert_allclose(log_mean_exp(v), brute, rtol=1e-12, atol=1e-12)


def test_far_tails_do_not_underflow():
    v = np.array([[-20000.0, -np.inf], [-20001.0, -np.inf]])
    got = log_mean_exp(v)
    expected = -20000.0 + np.log((1 + np.exp(-1.0)) / 2)  # shift by the max by hand
    assert got[0] == pytest.approx(expected, abs=1e-9) and got[1] == -np.inf
    with pytest.raises(ValueError):
        log_mean_exp(np.zeros((0, 3)))


# ---------------------------------------------------------------- an ensemble folder

def make_ensemble(tiny_run, root):
    """DIR/seed-0 (the tiny run), DIR/seed-1 (its epoch-1 weights), DIR/ensemble.json: the
    layout ``train --seeds`` writes."""
    root.mkdir()
    ignore = shutil.ignore_patterns(".lock", "scores*")
    shutil.copytree(tiny_run, root / "seed-0", ignore=ignore)
    shutil.copytree(tiny_run, root / "seed-1", ignore=ignore)
    shutil.copyfile(root / "seed-1/checkpoints/epoch-0001.safetensors",
                    root / "seed-1/model.safetensors")
    (root / "ensemble.json").write_text(json.dumps({"members": ["seed-0", "seed-1"]}))
    return RunDir(root)


@pytest.fixture(scope="module")
def ensemble(tiny_run, tmp_path_factory):
    from ood_audit.cli.app import main

    rd = make_ensemble(tiny_run, tmp_path_factory.mktemp("ens") / "ens")
    with pytest.raises(SystemExit) as exc:
        main(["score", "--run", str(rd.root), "--ood", "noise-uniform", "--ood", "constant",
              "--limit", "48", "--train-limit", "16", "--batch-size", "16", "--device", "cpu"])
    assert exc.value.code == 0
    df, meta = load_run_scores(rd)
    return rd, df, meta


def test_folder_resolves_to_member_zero(ensemble, tmp_path):
    rd, _, _ = ensemble
    assert resolve_run(rd.root).model == rd.root / "seed-0" / "model.safetensors"
    assert rd.ensemble_members() == [rd.root / "seed-0", rd.root / "seed-1"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ensemble.json").write_text('{"members": []}')
    with pytest.raises(UserError, match="ensemble.json is damaged"):
        resolve_run(bad)


def test_scores_land_in_the_folder(ensemble):
    rd, df, meta = ensemble
    assert (rd.scores / "part-0.parquet").exists()
    assert not (rd.root / "seed-0" / "scores").exists()
    _, info0 = load_checkpoint(rd.root / "seed-0" / "model.safetensors")
    assert meta.checkpoint_sha256 == info0.sha256
    assert json.loads(meta.extra["member1"])["path"].endswith("seed-1/model.safetensors")
    assert meta.extra["ensemble_size"] == "2"
    assert {"waic", "ensemble"} <= set(json.loads(meta.extra["detectors"]))


def test_member_terms_and_ensemble_column(ensemble):
    rd, df, meta = ensemble
    # each member's group totals add up to its log p(x), like the run's own
    np.testing.assert_allclose(df["log_pz_member1"] + df["logdet_member1"], df["log_px_member1"],
                               rtol=0, atol=1e-9)
    lp = df[["log_px", "log_px_member1"]].to_numpy()
    brute = np.log(np.exp(lp).mean(axis=1))
    np.testing.assert_allclose(df["log_px_ensemble"], brute, rtol=1e-12)
    np.testing.assert_array_equal(df["score_ensemble"], df["log_px_ensemble"])
    assert df["log_px_ensemble"].dtype == np.float64
    # member 1's column equals scoring member 1 alone on the same set (same noise)
    model1, info1 = load_checkpoint(rd.root / "seed-1" / "model.safetensors")
    from ood_audit.data import load_dataset

    job = ScoreJob(load_dataset("noise-uniform", "test", limit=48, shape=info1.input_shape,
                                seed=0), "ood")
    alone = np.concatenate([c["log_px"] for c in score_images(model1, job, 16,
                                                              torch.device("cpu"), 0)])
    rows = df[df.dataset == "noise-uniform"].sort_values("index")
    np.testing.assert_allclose(rows["log_px_member1"], alone, rtol=0, atol=1e-9)
    assert not np.allclose(rows["log_px_member1"], rows["log_px"])


def test_report_compares_ensemble_and_members(ensemble, tmp_path):
    rd, df, _ = ensemble
    res = build_report([rd], tmp_path / "rep", formats=["json", "md"], n_boot=0)
    table = res.summary["runs"][0]["ensemble"]
    assert table["members"] == ["member 0", "member 1"]
    ref = df[(df.role == "in") & (df.split == "test") & (df["transform"] == "none")]
    for row in table["rows"]:
        ood = df[(df.role == "ood") & (df.dataset == row["ood_set"])]
        y = np.r_[np.ones(len(ref)), np.zeros(len(ood))]
        for name, col in [("member 0", "log_px"), ("member 1", "log_px_member1"),
                          ("ensemble", "log_px_ensemble")]:
            assert row[name] == pytest.approx(roc_auc_score(y, np.r_[ref[col], ood[col]]))
        assert row["members_mean"] == pytest.approx((row["member 0"] + row["member 1"]) / 2)
    assert "Ensemble vs members" in res.files["md"].read_text()
    assert any(r["detector"] == "ensemble" for r in res.rows)
