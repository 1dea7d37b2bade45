"""Detectors through ``score`` and ``report`` on a tiny trained run: the background model,
ensemble members, held-out train rows, data features, one-line errors, the best mark."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import yaml

from ood_audit.analysis.detectors import waic_score
from ood_audit.analysis.tables import load_run_scores
from ood_audit.checkpoint import load_checkpoint
from ood_audit.commands.score import score_run
from ood_audit.errors import UserError
from ood_audit.report.build import build_report
from ood_audit.runs import RunDir
from ood_audit.scoring.jobs import held_out_job
from ood_audit.training.background import background_dir, train_background

SCORE = dict(limit=40, train_limit=24, batch_size=16, device="cpu", notify=lambda m: None)


def copy_run(src, dst) -> RunDir:
    """A private copy of the shared tiny run (the fixture is read-only)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "scores.parquet", "scores"))
    return RunDir(dst)


@pytest.fixture(scope="module")
def scored_with_twin(tiny_run, tmp_path_factory):
    """The tiny run scored with a background model identical to the run's own model and
    a second ensemble member (its epoch-1 checkpoint)."""
    tmp = tmp_path_factory.mktemp("det")
    rd = copy_run(tiny_run, tmp / "run")
    bg = background_dir(rd)
    bg.root.mkdir()
    shutil.copyfile(rd.model, bg.model)
    member = copy_run(tiny_run, tmp / "member")
    shutil.copyfile(member.epoch_checkpoint(1), member.model)
    score_run(rd, ["noise-uniform", "constant"], members=[member.root], **SCORE)
    df, meta = load_run_scores(rd)
    return rd, df, meta


def test_identical_background_gives_a_constant_ratio(scored_with_twin):
    _, df, meta = scored_with_twin
    # the same x (noise seeded by set and chunk, not model) under the same weights
    np.testing.assert_array_equal(df["log_px_background"], df["log_px"])
    assert (df["score_likelihood-ratio"] == 0.0).all()
    bg = json.loads(meta.extra["background"])
    assert bg["sha256"] == meta.checkpoint_sha256 and "mu" in bg


def test_default_writes_every_detector_that_applies(scored_with_twin):
    _, df, meta = scored_with_twin
    wrote = json.loads(meta.extra["detectors"])
    assert wrote[:4] == ["likelihood", "typicality", "likelihood-ratio", "complexity"]
    assert {"waic", "level-ratio"} <= set(wrote)
    for name in wrote[1:]:
        assert np.isfinite(df[f"score_{name}"]).all(), name
    assert "score_likelihood" not in df.columns  # that score is log_px itself
    assert {"log_px_background", "log_px_member1", "png_bits"} <= set(meta.extra_columns)
    assert not set(meta.extra_columns) & set(meta.terms)  # the sum of terms is untouched
    np.testing.assert_allclose(df[meta.terms].sum(axis=1), df["log_px"], atol=1e-6)
    assert json.loads(meta.extra["level_dims"]) == [32, 32]  # 1x8x8, two levels


def test_scored_columns_follow_the_formulas(scored_with_twin):
    _, df, meta = scored_with_twin
    np.testing.assert_allclose(
        df["score_waic"], waic_score(df[["log_px", "log_px_member1"]].to_numpy()))
    assert not np.allclose(df["log_px_member1"], df["log_px"])
    np.testing.assert_allclose(df["score_complexity"],
                               df["png_bits"] - df["bpd"] * df["n_dims"])
    train = df[(df.role == "in") & (df.split == "train")]
    h = -train["log_px"].mean()
    assert float(meta.extra["typicality_entropy_nats"]) == pytest.approx(h, rel=1e-5)
    np.testing.assert_allclose(df["score_typicality"], -np.abs(-df["log_px"] - h))
    flat = df[df.dataset == "constant"]
    noise = df[df.dataset == "noise-uniform"]
    assert noise["png_bits"].min() > flat["png_bits"].max()


def test_report_marks_the_best_detector(scored_with_twin, tmp_path):
    rd, _, _ = scored_with_twin
    res = build_report([rd], tmp_path / "rep", formats=["json", "md"], n_boot=0)
    for label in ("noise-uniform", "constant"):
        group = [r for r in res.rows if r["ood_set"] == label]
        top = max(r["auroc"] for r in group)
        assert {r["detector"] for r in group if r["best"]} == {
            r["detector"] for r in group if r["auroc"] == top}
        assert len(group) >= 6
    md = res.files["md"].read_text()
    assert "(best)" in md and "Typicality test on batches" in md
    summary = json.loads(res.files["json"].read_text())
    batches = summary["runs"][0]["typicality_batches"]
    assert {r["batch_size"] for r in batches["rows"]} == {1, 2, 5, 10}
    assert "likelihood-ratio background" in md


def test_named_detector_without_its_inputs_fails_before_scoring(tiny_run, tmp_path):
    rd = copy_run(tiny_run, tmp_path / "run")
    for name, words in [("waic", "--member"), ("likelihood-ratio", "train --background"),
                        ("nope", "unknown detector")]:
        with pytest.raises(UserError, match=words):
            score_run(rd, ["noise-uniform"], detectors=[name], **SCORE)
        assert not rd.scores.exists()
    with pytest.raises(UserError, match="typicality.*train rows"):
        score_run(rd, ["noise-uniform"], detectors=["typicality"],
                  **{**SCORE, "train_limit": 0})
    with pytest.raises(UserError, match="not found|no such|does not exist"):
        score_run(rd, ["noise-uniform"], members=[tmp_path / "missing"], **SCORE)


def test_one_named_detector_writes_only_its_column(tiny_run, tmp_path):
    rd = copy_run(tiny_run, tmp_path / "run")
    score_run(rd, ["noise-uniform"], detectors=["complexity"], **SCORE)
    df, meta = load_run_scores(rd)
    assert [c for c in df.columns if c.startswith("score_")] == ["score_complexity"]
    assert meta.extra_columns == ["png_bits"]


def test_held_out_train_rows(tiny_run, tmp_path):
    rd = copy_run(tiny_run, tmp_path / "run")  # trained with --limit 128 on 256 images
    score_run(rd, ["noise-uniform"], held_out=True, detectors=["typicality"], **SCORE)
    df, meta = load_run_scores(rd)
    train = df[df.split == "train"]
    assert train["index"].tolist() == list(range(128, 128 + 24))
    assert "held out" in meta.extra["train_rows"]
    _, info = load_checkpoint(rd.model)
    whole = dataclasses.replace(info, run_config={**info.run_config, "train": {"limit": None}})
    with pytest.raises(UserError, match="--held-out needs a run trained with --limit"):
        held_out_job(whole, 10, root=None, download=False)


def test_train_background_nested_run(tiny_run, tmp_path):
    rd = copy_run(tiny_run, tmp_path / "run")
    (tmp_path / "latest").write_text("somewhere\n")
    out = train_background(rd, mu=0.2, weight_decay=1e-3, overrides={"epochs": 1},
                           runs_root=tmp_path, log=lambda m: None)
    bg = background_dir(rd)
    assert out.run_dir == bg.root and bg.model.exists()
    cfg = yaml.safe_load(bg.config.read_text())
    assert cfg["train"]["perturb_mu"] == 0.2 and cfg["train"]["weight_decay"] == 1e-3
    assert cfg["train"]["epochs"] == 1 and cfg["data"] == yaml.safe_load(
        rd.config.read_text())["data"]
    assert (tmp_path / "latest").read_text() == "somewhere\n"  # latest is left alone
    with pytest.raises(UserError, match="already has a background"):
        train_background(rd, runs_root=tmp_path, log=lambda m: None)
    score_run(rd, ["noise-uniform"], detectors=["likelihood-ratio"], **SCORE)
    df, meta = load_run_scores(rd)
    assert json.loads(meta.extra["background"])["mu"] == 0.2
    assert not np.allclose(df["score_likelihood-ratio"], 0.0)


# ------------------------------------------------------------------ CLI

def _cli(argv, capsys):
    from ood_audit.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_cli_detector_errors_are_one_line(tiny_run, tmp_path, capsys):
    rd = copy_run(tiny_run, tmp_path / "run")
    for argv, words in [(["--detector", "waic"], "--member"),
                        (["--detector", "bogus"], "unknown detector 'bogus'"),
                        (["--detector", "likelihood-ratio"], "train --background")]:
        code, _, err = _cli(["score", "--run", str(rd.root), "--ood", "noise-uniform",
                             "--limit", "8", "--device", "cpu", *argv], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _cli(["train", "--mu", "0.2"], capsys)
    assert code == 2 and "--background" in err
    code, _, err = _cli(["train", "--background", "--run", str(rd.root), "--model", "glow"],
                        capsys)
    assert code == 2 and "--model" in err


def test_cli_background_then_score_prints_detectors(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rd = copy_run(tiny_run, tmp_path / "run")
    code, out, err = _cli(["train", "--background", "--run", str(rd.root), "--mu", "0.15",
                           "--epochs", "1", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "background" in out and background_dir(rd).model.exists()
    assert not (tmp_path / "runs" / "latest").exists()  # latest is not moved
    code, out, err = _cli(["score", "--run", str(rd.root), "--ood", "noise-uniform",
                           "--limit", "16", "--train-limit", "8", "--device", "cpu",
                           "--detector", "likelihood-ratio", "--detector", "complexity"],
                          capsys)
    assert code == 0, err
    assert "likelihood-ratio" in out and "complexity" in out
    df, meta = load_run_scores(rd)
    assert json.loads(meta.extra["detectors"]) == ["likelihood-ratio", "complexity"]
