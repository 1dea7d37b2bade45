"""decompose --over-training: term means per epoch checkpoint on a fixed subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ood_audit.analysis.over_training import over_training, wide
from ood_audit.checkpoint import load_checkpoint
from ood_audit.errors import UserError
from ood_audit.runs import RunDir
from ood_audit.scoring.batches import score_images
from ood_audit.scoring.jobs import ScoreJob


@pytest.fixture(scope="module")
def table(tiny_run):
    return over_training(RunDir(tiny_run), ["noise-uniform"], limit=40, device="cpu", seed=5)


def test_one_row_per_epoch_set_and_term(table, tiny_run):
    assert sorted(table["epoch"].unique()) == [1, 2]
    assert set(table["term"]) == {"log_px", "bpd", "log_pz", "logdet"}
    assert set(table["role"]) == {"in", "ood"}
    assert (table["n"] == 40).all()
    assert RunDir(tiny_run).over_training.exists()


def test_terms_add_up_per_epoch(table):
    for _, sub in table.groupby(["epoch", "dataset"]):
        m = sub.set_index("term")["mean"]
        assert m["log_pz"] + m["logdet"] == pytest.approx(m["log_px"], abs=1e-6)


def test_last_epoch_equals_scoring_the_final_model(table, tiny_run):
    model, info = load_checkpoint(RunDir(tiny_run).model)
    from ood_audit.data import load_dataset

    job = ScoreJob(load_dataset("noise-uniform", "test", limit=40, shape=info.input_shape,
                                seed=5), "ood")  # build_jobs seeds synthetic sets too
    log_px = np.concatenate([c["log_px"] for c in score_images(model, job, 16,
                                                              torch.device("cpu"), 5)])
    got = table.query("epoch == 2 and dataset == 'noise-uniform' and term == 'log_px'")["mean"]
    assert float(got.iloc[0]) == pytest.approx(log_px.mean(), abs=1e-6)
    first = table.query("epoch == 1 and dataset == 'noise-uniform' and term == 'log_px'")["mean"]
    assert float(first.iloc[0]) != pytest.approx(log_px.mean(), abs=1e-3)  # weights differ


def test_wide_shape(table):
    grid = wide(table)
    assert list(grid.index) == [1, 2]
    assert ("noise-uniform", "logdet") in grid.columns


def test_no_checkpoints_is_a_user_error(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(UserError, match="keep-checkpoints all"):
        over_training(RunDir(tmp_path / "r"), [], limit=10)
