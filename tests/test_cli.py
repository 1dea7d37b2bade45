"""The CLI end to end on tiny data: help, train -> score, and one-line errors (exit 2)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ood_audit.cli.app import app, main
from ood_audit.data import DATASETS
from ood_audit.models.registry import MODELS


def run(argv, capsys):
    """Run the console-script entry in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_help_lists_commands_and_registry_choices():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "score", "decompose", "report"):
        assert cmd in result.output
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in MODELS:
        assert name in result.output
    result = runner.invoke(app, ["score", "--help"], terminal_width=200)
    for name in DATASETS:
        assert name in result.output


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_then_score_with_latest_pointer(in_tmp, tiny_data, tiny_ood, capsys):
    code, out, err = run(["train", "--model", "glow", "--data", str(tiny_data), "--preset", "tiny",
                          "--epochs", "1", "--limit", "64", "--batch-size", "32",
                          "--device", "cpu", "--out", "runs/t1"], capsys)
    assert code == 0, err
    assert "trained" in out and (in_tmp / "runs/t1/model.safetensors").exists()
    assert (in_tmp / "runs/latest").read_text().strip().endswith("runs/t1")
    # score defaults to runs/latest, as in the design card's usage
    code, out, err = run(["score", "--ood", "noise-uniform", "--ood", str(tiny_ood),
                          "--limit", "40", "--train-limit", "20"], capsys)
    assert code == 0, err
    assert (in_tmp / "runs/t1/scores/part-0.parquet").exists()
    assert "noise-uniform" in out and "AUROC" in out


def test_train_from_yaml_config(in_tmp, tiny_data, capsys):
    cfg = in_tmp / "c.yaml"
    cfg.write_text(f"model: glow-cv\npreset: tiny\ndata: {tiny_data}\n"
                   "train: {epochs: 1, limit: 32, batch_size: 16, device: cpu}\n")
    code, out, err = run(["train", "--config", str(cfg), "--out", "runs/cv"], capsys)
    assert code == 0, err
    assert "glow-cv" in out


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv, needles", [
    (["train", "--model", "nope", "--data", "noise-uniform"], ["unknown model 'nope'", "glow"]),
    (["train", "--data", "nope"], ["unknown data set", "fashionmnist"]),
    (["train", "--epochs", "0"], ["epochs must be positive"]),
    (["train", "--config", "missing.yaml"], ["cannot read config"]),
    (["train", "--resume"], ["--resume needs --out"]),
    (["score", "--ood", "mnist"], ["no run given"]),
    (["score", "--ood", "mnist", "--run", "nowhere"], ["nowhere", "does not exist"]),
    (["score"], ["--ood"]),
    (["decompose", "--run", "nowhere"], ["nowhere"]),
    (["report", "nowhere"], ["nowhere"]),
])
def test_bad_input_is_one_line_exit_2(in_tmp, argv, needles, capsys):
    code, _, err = run(argv, capsys)
    _one_line_error(code, err, *needles)


def test_missing_data_root_names_the_folder(in_tmp, capsys):
    code, _, err = run(["train", "--data", "mnist", "--data-root", str(in_tmp / "empty"),
                        "--preset", "tiny"], capsys)
    _one_line_error(code, err, str(in_tmp / "empty"), "--data-root")


def test_bad_config_key_is_named(in_tmp, capsys):
    cfg = in_tmp / "c.yaml"
    cfg.write_text("model: glow\ntrain: {epohcs: 2}\n")
    code, _, err = run(["train", "--config", str(cfg)], capsys)
    _one_line_error(code, err, "epohcs")


def test_score_errors_on_run_and_ood(in_tmp, tiny_run, capsys):
    code, _, err = run(["score", "--run", str(tiny_run), "--ood", "nope"], capsys)
    _one_line_error(code, err, "nope")
    code, _, err = run(["score", "--run", str(tiny_run), "--ood", "noise-uniform",
                        "--limit", "0"], capsys)
    _one_line_error(code, err, "--limit")


def test_unknown_option_is_a_usage_error(capsys):
    code, _, err = run(["train", "--bogus"], capsys)
    assert code == 2 and "bogus" in err and "Traceback" not in err


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("ood-audit ")


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ood_audit", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "score" in result.stdout


def test_progress_off_a_terminal_is_a_plain_line_now_and_then(monkeypatch, capsys):
    # CI logs have no terminal: a long scoring job (likelihood regret) must still say it moves
    from ood_audit.cli import render

    monkeypatch.setattr(render.CountBar, "LINE_EVERY_S", 0.0)
    with render.CountBar() as bar:
        bar.start("mnist (test)", 30)
        bar.advance(10, images_per_s=2.5)
        bar.advance(10)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == ["mnist (test): 10/30, 2.5 img/s", "mnist (test): 20/30"]

    monkeypatch.setattr(render.CountBar, "LINE_EVERY_S", 3600.0)
    with render.CountBar() as bar:
        bar.start("mnist (test)", 30)
        bar.advance(30)
    assert capsys.readouterr().err.strip() == ""
