"""``ood-audit run EXPERIMENT.yaml``: schema, the paper's files, end to end on tiny data,
skipping complete steps, dry-run commands that reproduce the run, early data errors."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ood_audit.cli.app import main
from ood_audit.errors import UserError
from ood_audit.experiments import load_experiment, plan, second_order_available, statuses
from ood_audit.runs import RunDir


def scores_of(run_dir: Path) -> pd.DataFrame:
    from ood_audit.analysis.tables import load_run_scores

    return load_run_scores(RunDir(run_dir))[0]

PAPER = sorted((Path(__file__).resolve().parents[1] / "examples" / "paper").glob("*.yaml"))


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tiny_experiment(data, ood, **over) -> dict:
    """A Glow `tiny` experiment that trains 1 epoch on 64 8x8 images."""
    spec = {
        "name": "tiny",
        "train": {"model": "glow", "preset": "tiny", "data": str(data),
                  "train": {"epochs": 1, "batch_size": 32, "limit": 64, "test_limit": 32,
                            "warmup_steps": 5, "device": "cpu", "keep_checkpoints": "all"}},
        "score": {"ood": [str(ood), "noise-uniform"], "limit": 40, "train_limit": 20},
        "decompose": {"over_training": True, "over_training_limit": 16},
        "report": {"formats": "md,json", "n_boot": 20,
                   "gates": ["noise-uniform:likelihood:auroc>=0.0"]},
    }
    for key, value in over.items():
        spec[key] = value
    return spec


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------ schema and the paper's files

def test_the_paper_experiments_are_all_there():
    names = {p.stem for p in PAPER}
    assert {"fashionmnist_vs_mnist", "fashionmnist_glow_vs_glowcv", "fashionmnist_contrast",
            "fashionmnist_ensemble", "cifar10_vs_svhn", "svhn_vs_cifar10", "celeba_vs_svhn",
            "imagenet32_vs_cifar10_cifar100_svhn"} <= names


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_yaml_parses_with_and_without_its_gpu_variant(path):
    small = load_experiment(path)
    assert small.name == path.stem and small.out == Path("runs") / path.stem
    assert small.paper and small.score.ood and small.report.gates
    gpu = load_experiment(path, variant="gpu")
    assert gpu.out == Path("runs") / f"{path.stem}-gpu"
    for s_run, g_run in zip(small.runs, gpu.runs, strict=True):
        assert s_run.config.preset == "small" and g_run.config.preset == "paper"
        assert g_run.config.train.device == "cuda"
        assert g_run.config.model == s_run.config.model  # a variant changes size, not model
    # every step has a CLI command; the train one rebuilds the same config
    steps = plan(small)
    assert [s.kind for s in steps][-1] == "report"
    assert all(s.command().splitlines()[-1].startswith("ood-audit ") for s in steps)


def test_paper_multi_run_and_ensemble_files():
    cv = load_experiment(next(p for p in PAPER if p.stem == "fashionmnist_glow_vs_glowcv"))
    assert [r.config.model for r in cv.runs] == ["glow", "glow-cv"]
    ens = load_experiment(next(p for p in PAPER if p.stem == "fashionmnist_ensemble"))
    (run_,) = ens.runs
    assert [cfg.train.seed for _, cfg in run_.members] == [0, 1, 2]
    assert [rd.root.name for rd, _ in run_.members] == ["seed-0", "seed-1", "seed-2"]
    contrast = load_experiment(next(p for p in PAPER if p.stem == "fashionmnist_contrast"))
    assert contrast.score.transforms == ["contrast=0.25", "contrast=0.5", "contrast=0.75",
                                         "contrast=1.5"]


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.update(colour="red"), "colour"),
    (lambda s: s["train"]["train"].update(epohcs=2), "epohcs"),
    (lambda s: s["score"].update(oods=["mnist"]), "oods"),
    (lambda s: s["decompose"].update(second_ordr=True), "second_ordr"),
    (lambda s: s["report"].update(gate=["x"]), "gate"),
    (lambda s: s.update(runs=[{"name": "a", "trian": {}}]), "trian"),
    (lambda s: s.update(variants={"gpu": {"train": {"presett": "paper"}}}), "presett"),
    (lambda s: s["train"].update(model="nope"), "nope"),
    (lambda s: s["train"].update(model_config={"hiden": 3}), "hiden"),
    (lambda s: s["score"].update(ood=[]), "ood"),
])
def test_bad_key_is_one_line_exit_2(in_tmp, tiny_data, tiny_ood, edit, needle, capsys):
    spec = tiny_experiment(tiny_data, tiny_ood)
    edit(spec)
    path = write(in_tmp / "e.yaml", spec)
    code, _, err = run(["run", str(path), "--dry-run"], capsys)
    one_line_error(code, err, needle)
    assert not (in_tmp / "runs").exists()


def test_unknown_variant_names_the_defined_ones(in_tmp, tiny_data, tiny_ood, capsys):
    spec = tiny_experiment(tiny_data, tiny_ood, variants={"gpu": {"train": {"preset": "paper"}}})
    code, _, err = run(["run", str(write(in_tmp / "e.yaml", spec)), "--variant", "tpu"], capsys)
    one_line_error(code, err, "'tpu'", "gpu")


@pytest.mark.skipif(second_order_available(), reason="second-order analysis is available")
def test_second_order_says_it_is_not_available(in_tmp, tiny_data, tiny_ood):
    spec = tiny_experiment(tiny_data, tiny_ood, decompose={"second_order": True})
    with pytest.raises(UserError, match="second_order is not available"):
        load_experiment(write(in_tmp / "e.yaml", spec))


def test_missing_data_set_fails_before_any_work(in_tmp, capsys):
    empty = in_tmp / "empty"
    empty.mkdir()
    path = next(p for p in PAPER if p.stem == "cifar10_vs_svhn")
    code, _, err = run(["run", str(path), "--data-root", str(empty), "--preset", "tiny"], capsys)
    one_line_error(code, err, str(empty), "cifar-10-batches-py")
    assert not (in_tmp / "runs").exists()  # nothing written, not even the folder


# ------------------------------------------------------------------ end to end on tiny data

def test_tiny_experiment_end_to_end_then_rerun_skips(in_tmp, tiny_data, tiny_ood, capsys):
    path = write(in_tmp / "e.yaml", tiny_experiment(tiny_data, tiny_ood))
    code, out, err = run(["run", str(path)], capsys)
    assert code == 0, err
    rd = in_tmp / "runs/tiny/glow"
    for name in ("model.safetensors", "decomposition.parquet", "over_training.parquet"):
        assert (rd / name).exists(), name
    for name in ("summary.json", "report.md"):
        assert (in_tmp / "runs/tiny/report" / name).exists(), name
    assert out.count("took ") == 4 and "total" in out
    scores = scores_of(rd)
    assert {"in", "ood"} == set(scores["role"]) and len(scores[scores["dataset"] == "noise-uniform"]) == 40
    # the report's AUROC is the scores' own (recomputed here with scikit-learn)
    import json

    from sklearn.metrics import roc_auc_score

    summary = json.loads((in_tmp / "runs/tiny/report/summary.json").read_text())
    assert summary["gates_passed"] is True
    row = next(m for m in summary["metrics"] if m["dataset"] == "noise-uniform"
               and m["detector"] == "likelihood")
    ref = scores[(scores["role"] == "in") & (scores["split"] == "test")
                 & (scores["transform"] == "none")]  # (DataFrame.transform is a method)
    noise = scores[scores["dataset"] == "noise-uniform"]
    expected = roc_auc_score(np.r_[np.ones(len(ref)), np.zeros(len(noise))],
                             np.r_[ref.log_px, noise.log_px])
    assert row["auroc"] == pytest.approx(expected, abs=1e-9)
    mtime = (rd / "model.safetensors").stat().st_mtime_ns

    # a rerun does nothing
    code, out, err = run(["run", str(path)], capsys)
    assert code == 0, err
    assert out.count(": skipped,") == 4 and "took " not in out
    assert (rd / "model.safetensors").stat().st_mtime_ns == mtime

    # changing the score section redoes score, decompose and report, not the training
    spec = tiny_experiment(tiny_data, tiny_ood)
    spec["score"]["limit"] = 24
    write(path, spec)
    code, out, err = run(["run", str(path)], capsys)
    assert code == 0, err
    assert out.count(": skipped,") == 1 and out.count("took ") == 3
    assert (rd / "model.safetensors").stat().st_mtime_ns == mtime
    assert len(scores_of(rd).query("dataset == 'noise-uniform'")) == 24

    # more epochs: the train step resumes the run; another preset: a one-line refusal
    spec["train"]["train"]["epochs"] = 2
    exp = load_experiment(write(path, spec))
    assert statuses(exp, plan(exp)) == ["resume", "new", "new", "new"]
    spec["train"]["preset"] = "small"
    code, _, err = run(["run", str(write(path, spec))], capsys)
    one_line_error(code, err, "preset", "--force")


def test_failed_gate_exits_1_and_the_rerun_says_so_again(in_tmp, tiny_data, tiny_ood, capsys):
    spec = tiny_experiment(tiny_data, tiny_ood, decompose={})
    spec["report"]["gates"] = ["noise-uniform:likelihood:auroc<0.0"]  # cannot hold
    path = write(in_tmp / "e.yaml", spec)
    code, _, err = run(["run", str(path)], capsys)
    assert code == 1 and "auroc" in err
    code, out, err = run(["run", str(path)], capsys)
    assert code == 1 and out.count(": skipped,") == 4, err


def test_dry_run_script_reproduces_the_run(in_tmp, tiny_data, tiny_ood, capsys):
    """The printed commands, run by a shell, give the same scores as ``ood-audit run``."""
    spec = tiny_experiment(tiny_data, tiny_ood, decompose={})
    spec["report"]["formats"] = "json"
    path = write(in_tmp / "e.yaml", spec)
    code, script, err = run(["run", str(path), "--dry-run", "--out", "shell"], capsys)
    assert code == 0, err
    assert script.count("ood-audit ") == 4 and "--out shell/glow" in script
    assert not (in_tmp / "shell").exists()  # a dry run writes nothing
    code, _, err = run(["run", str(path)], capsys)
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shell = f"ood-audit() {{ {shlex.quote(sys.executable)} -m ood_audit \"$@\"; }}\nset -e\n" + script
    done = subprocess.run(["bash", "-c", shell], cwd=in_tmp, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = scores_of(in_tmp / "runs/tiny/glow"), scores_of(in_tmp / "shell/glow")
    assert list(a["dataset"]) == list(b["dataset"])
    np.testing.assert_allclose(a["log_px"], b["log_px"], rtol=1e-5, atol=1e-4)
    assert (in_tmp / "shell/report/summary.json").exists()


def test_seeds_train_an_ensemble_scored_with_waic(in_tmp, tiny_data, tiny_ood, capsys):
    spec = tiny_experiment(tiny_data, tiny_ood, decompose={})
    spec["train"]["seeds"] = [3, 4]
    spec["report"]["formats"] = "json"
    path = write(in_tmp / "e.yaml", spec)
    code, script, err = run(["run", str(path), "--dry-run"], capsys)
    assert code == 0 and "--seeds 3,4 --out runs/tiny/glow" in script, err
    code, _, err = run(["run", str(path)], capsys)
    assert code == 0, err
    root = in_tmp / "runs/tiny/glow"
    seeds = [yaml.safe_load((root / f"seed-{s}/config.yaml").read_text())["train"]["seed"]
             for s in (3, 4)]
    assert seeds == [3, 4]
    scores = scores_of(root)  # the ensemble folder: member 0 scored, member 1 beside it
    assert "log_px_member1" in scores and "score_waic" in scores
    # members differ (else the ensemble is one model twice): their log p(x) is not equal
    assert not np.allclose(scores["log_px"], scores["log_px_member1"])
    code, out, err = run(["run", str(path)], capsys)
    assert code == 0 and out.count(": skipped,") == 4, err


@pytest.mark.skipif(not second_order_available(), reason="no second-order analysis here")
def test_second_order_is_written(in_tmp, tiny_data, tiny_ood, capsys):
    spec = tiny_experiment(tiny_data, tiny_ood, decompose={"second_order": True,
                                                           "second_order_limit": 8})
    spec["score"]["ood"] = [str(tiny_ood)]
    spec["report"]["formats"] = "json"
    spec["report"]["gates"] = []
    code, out, err = run(["run", str(write(in_tmp / "e.yaml", spec))], capsys)
    assert code == 0, err
    import json

    result = json.loads((in_tmp / "runs/tiny/glow/second_order.json").read_text())
    assert result["limit"] == 8
