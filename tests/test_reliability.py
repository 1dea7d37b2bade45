"""Interruption, corrupted or foreign files, concurrency, bad input, numerical trouble
(issue #8).

The interruption tests run ``python -m ood_audit train`` as a real subprocess (1 CPU
thread, as the in-process reference run) and kill it: SIGKILL mid-epoch, then SIGTERM
and SIGINT mid-epoch; each run is resumed with ``--resume`` and must end with exactly
the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import blobs

from ood_audit.checkpoint import file_sha256, load_checkpoint, read_metadata
from ood_audit.cli.app import main
from ood_audit.config import RunConfig, TrainConfig
from ood_audit.errors import UserError
from ood_audit.runs import RunDir, run_lock
from ood_audit.training.run import load_run_config, train_run

# ----------------------------------------------------------------------------- helpers

#: One thread in every training process: the same float summation order everywhere.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
EPOCHS = 3
TRAIN_YAML = """\
model: glow
preset: tiny
data: {data}
train: {{epochs: {epochs}, batch_size: 8, limit: 512, test_limit: 32, warmup_steps: 10,
        lr: 0.002, seed: 3, device: cpu}}
"""


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def one_error_line(code: int, err: str, *needles: str, expect: int = 2, prefix: str = "error:") -> str:
    """Exit ``expect`` (2: a user error) with exactly one ``prefix`` line holding every
    needle; no traceback."""
    assert code == expect, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith(prefix)]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def same_weights(a: Path, b: Path) -> None:
    ma, _ = load_checkpoint(a)
    mb, _ = load_checkpoint(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-6, msg=key)


def epochs_done(rd: RunDir) -> int:
    """Rows of metrics.parquet: written atomically, so always whole when it exists."""
    return len(pd.read_parquet(rd.metrics)) if rd.metrics.exists() else 0


class TrainProcess:
    """A ``python -m ood_audit train`` subprocess."""

    def __init__(self, argv: list[str], cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "ood_audit", "train", *argv],
                                     cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def wait_until(self, condition, timeout: float = 180) -> None:
        t0 = time.monotonic()
        while not condition():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"train ended early (exit {self.proc.returncode}):\n{err}")
            if time.monotonic() - t0 > timeout:
                self.proc.kill()
                raise AssertionError("timed out waiting for the training subprocess")
            time.sleep(0.02)

    def send(self, sig: int) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=180)
        return self.proc.returncode, out, err

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, out, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """512 8x8 images (64 batches of 8 per epoch), the run config, and the weights of an
    uninterrupted run trained in-process with one thread."""
    root = tmp_path_factory.mktemp("reliability")
    data = root / "blobs512.npy"
    np.save(data, blobs(512, seed=5))
    yaml_path = root / "train.yaml"
    yaml_path.write_text(TRAIN_YAML.format(data=data, epochs=EPOCHS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train_run(load_run_config(yaml_path), root / "reference", runs_root=root,
                        log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "data": data, "yaml": yaml_path, "reference": RunDir(ref.run_dir)}


# ----------------------------------------------------------------------------- interruption


def test_sigkill_then_sigterm_mid_epoch_resume_to_the_uninterrupted_weights(work):
    """SIGKILL in epoch 2 (resume from epoch 1's state), then SIGTERM in epoch 3 of the
    resumed process (state saved mid-epoch), then a resume to the end."""
    root = work["root"]
    rd = RunDir(root / "killed")
    run = TrainProcess(["--config", str(work["yaml"]), "--out", str(rd.root)], cwd=root)
    try:
        run.wait_until(lambda: rd.train_state.exists())  # epoch 1 is saved
        time.sleep(0.1)  # into epoch 2 (64 steps: about 2 s here, far more than 0.1 s anywhere)
        code, _, _ = run.send(signal.SIGKILL)
    finally:
        run.stop()
    assert code == -signal.SIGKILL
    assert epochs_done(rd) == 1, "the kill landed after epoch 2 ended: not mid-epoch"
    # What a reader sees after a kill is whole: the epoch-1 checkpoint, state and metrics.
    assert read_metadata(rd.model)["epoch"] == "1"
    load_checkpoint(rd.model)
    # A half-written temporary from a kill during a save is ignored, then removed.
    stale = rd.root / ".model.safetensors.k1ll3d.tmp"
    stale.write_bytes(rd.model.read_bytes()[:100])

    run = TrainProcess(["--resume", "--out", str(rd.root)], cwd=root)
    try:
        run.wait_until(lambda: epochs_done(rd) == 2)
        time.sleep(0.1)
        code, _, err = run.send(signal.SIGTERM)
    finally:
        run.stop()
    assert "resuming" in err and "at epoch 2, batch 1" in err, err
    assert not stale.exists()
    # SIGTERM (a scheduler's stop): 128 + 15, as shells report it, and one "interrupted:" line
    line = one_error_line(code, err, "stopped by SIGTERM at epoch 3",
                          f"state saved: continue with ood-audit train --resume --out {rd.root}",
                          expect=143, prefix="interrupted:")
    batch = int(line.split(", batch ")[1].split("/")[0])
    assert 0 < batch < 64, line  # mid-epoch

    run = TrainProcess(["--resume", "--out", str(rd.root)], cwd=root)
    try:
        code, out, err = run.finish()
    finally:
        run.stop()
    assert code == 0, err
    assert f"at epoch 3, batch {batch + 1}" in err and "trained glow" in out, err
    assert epochs_done(rd) == EPOCHS
    same_weights(rd.model, work["reference"].model)
    same_weights(rd.epoch_checkpoint(2), work["reference"].epoch_checkpoint(2))


class SignalAt:
    """A progress callback that sends this process ``sig`` after batch ``batch`` of epoch
    ``epoch`` (0-based): a Ctrl-C at an exact step, in-process."""

    def __new__(cls, sig: int, epoch: int, batch: int):
        from ood_audit.training.trainer import TrainProgress

        class Progress(TrainProgress):
            current = -1

            def epoch_start(self, e, *_):
                self.current = e

            def batch(self, b, *_):
                if self.current == epoch and b == batch:
                    os.kill(os.getpid(), sig)

        return Progress()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_mid_epoch_and_resume_continues_the_same_trajectory(work, tmp_path, sig):
    rd = RunDir(tmp_path / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run
    try:
        with pytest.raises(UserError) as stopped:
            train_run(load_run_config(work["yaml"]), rd.root, runs_root=tmp_path,
                      log=lambda m: None, progress=SignalAt(sig, epoch=1, batch=17))
        assert str(stopped.value) == (
            f"stopped by {signal.Signals(sig).name} at epoch 2, batch 17/64; state saved: "
            f"continue with ood-audit train --resume --out {rd.root}")
        assert signal.getsignal(sig) is not None  # the old handler is back
        logs: list[str] = []
        train_run(None, rd.root, resume=True, runs_root=tmp_path, log=logs.append)
    finally:
        torch.set_num_threads(threads)
    assert "at epoch 2, batch 18" in logs[-1], logs
    same_weights(rd.model, work["reference"].model)


# ----------------------------------------------------------------------------- concurrency


def test_second_writer_on_a_busy_run_is_refused(tiny_run, tmp_path):
    """A train holds the run (resuming a copy of tiny_run for many epochs); a second
    train (a real process), a new train and a score each refuse in one line; the holder
    carries on; once it is killed the lock is free again."""
    rd = RunDir(tmp_path / "busy")
    # without any scores another test wrote into the shared tiny_run (test_scoring does)
    shutil.copytree(tiny_run, rd.root, ignore=shutil.ignore_patterns(".lock", "scores*"))
    holder = TrainProcess(["--resume", "--out", str(rd.root), "--epochs", "1000"], cwd=tmp_path)
    try:
        holder.wait_until(lambda: rd.lock.exists()
                          and rd.lock.read_text().startswith(f"pid {holder.proc.pid} "))
        in_use = f"is in use by pid {holder.proc.pid} (ood-audit train)"
        second = TrainProcess(["--resume", "--out", str(rd.root), "--epochs", "5"], cwd=tmp_path)
        code, _, err = second.finish()
        one_error_line(code, err, str(rd.root), in_use)
        code, _, err = cli(["train", "--data", "noise-uniform", "--out", str(rd.root)])
        one_error_line(code, err, in_use)
        code, _, err = cli(["score", "--run", str(rd.root), "--ood", "noise-uniform",
                            "--limit", "8", "--train-limit", "8", "--device", "cpu"])
        one_error_line(code, err, in_use)
        assert not rd.scores.exists()
        assert holder.proc.poll() is None, "the first writer must carry on undisturbed"
        holder.proc.kill()
        holder.proc.communicate()
    finally:
        holder.stop()
    with run_lock(rd, "test"):  # the kernel released the dead process's lock
        pass
    load_checkpoint(rd.model)  # and what it wrote is whole


# ----------------------------------------------------------------------------- resume edge cases


def _quick_cfg(data, **train) -> RunConfig:
    base = dict(epochs=2, batch_size=32, limit=64, test_limit=16, warmup_steps=2, device="cpu")
    base.update(train)
    return RunConfig(model="glow", preset="tiny", data=str(data), train=TrainConfig(**base))


def test_killed_before_the_first_epoch_ended_resume_starts_over(tiny_data, tmp_path):
    full = train_run(_quick_cfg(tiny_data), tmp_path / "full", runs_root=tmp_path,
                     log=lambda m: None)
    # A kill during epoch 1 leaves config.yaml (and at most epoch 1's weights) only.
    rd = RunDir(tmp_path / "early")
    train_run(_quick_cfg(tiny_data), rd.root, runs_root=tmp_path, log=lambda m: None)
    rd.train_state.unlink()
    shutil.copyfile(rd.epoch_checkpoint(1), rd.model.with_suffix(".tmp1"))
    os.replace(rd.model.with_suffix(".tmp1"), rd.model)  # epoch 1's weights, no state
    logs: list[str] = []
    train_run(None, rd.root, resume=True, runs_root=tmp_path, log=logs.append)
    assert any("from the start" in m for m in logs), logs
    same_weights(rd.model, RunDir(full.run_dir).model)


def test_weights_of_a_later_epoch_without_state_are_not_resumed(tiny_run, tmp_path):
    rd = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run, rd.root)
    rd.train_state.unlink()
    code, _, err = cli(["train", "--resume", "--out", str(rd.root)])
    one_error_line(code, err, "no train_state.pt", "cannot continue exactly")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "not_a_dict",
                                    "other_model"])
def test_damaged_train_state_is_one_line(tiny_run, tiny_data, tmp_path, damage):
    rd = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run, rd.root)
    raw = rd.train_state.read_bytes()
    if damage == "truncated":
        rd.train_state.write_bytes(raw[: len(raw) // 2])
    elif damage == "random":
        rd.train_state.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "empty":
        rd.train_state.write_bytes(b"")
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], rd.train_state)
    else:  # the state of a VAE in a Glow run
        vae = _quick_cfg(tiny_data, epochs=1)
        vae.model = "vae"
        other = train_run(vae, tmp_path / "vae", runs_root=tmp_path, log=lambda m: None)
        shutil.copyfile(RunDir(other.run_dir).train_state, rd.train_state)
    before = file_sha256(rd.model)
    code, _, err = cli(["train", "--resume", "--out", str(rd.root), "--epochs", "3"])
    one_error_line(code, err, f"cannot resume from {rd.train_state}")
    assert file_sha256(rd.model) == before  # the checkpoint is left as it was


def test_vae_resume_restores_the_rng(tiny_data, tmp_path):
    """The VAE samples z in its loss: without the global RNG state in train_state.pt a
    resumed run would draw other z and leave the uninterrupted trajectory."""
    cfg = _quick_cfg(tiny_data)
    cfg.model = "vae"
    full = train_run(cfg, tmp_path / "full", runs_root=tmp_path, log=lambda m: None)
    half_cfg = _quick_cfg(tiny_data, epochs=1)
    half_cfg.model = "vae"
    train_run(half_cfg, tmp_path / "half", runs_root=tmp_path, log=lambda m: None)
    torch.manual_seed(12345)  # whatever the process did in between
    torch.rand(7)
    resumed = train_run(None, tmp_path / "half", resume=True, resume_epochs=2,
                        runs_root=tmp_path, log=lambda m: None)
    same_weights(RunDir(resumed.run_dir).model, RunDir(full.run_dir).model)


# ----------------------------------------------------------------------------- corrupted files


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    import json

    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])["__metadata__"]


def _replace_model(rd: RunDir, kind: str, tmp_path: Path, tiny_data: Path) -> str:
    """Damage rd's model.safetensors in one way; returns what the error must say."""
    from safetensors.torch import save_file

    raw = rd.model.read_bytes()
    rd.model.unlink()  # a hard link to an epoch checkpoint: never write through it
    meta = _safetensors_metadata(raw)
    if kind == "truncated":
        rd.model.write_bytes(raw[: len(raw) // 2])
        return "is not a readable safetensors checkpoint"
    if kind == "header_only":
        (n,) = struct.unpack("<Q", raw[:8])
        rd.model.write_bytes(raw[: 8 + n])
        return "is not a readable safetensors checkpoint"
    if kind == "random":
        rd.model.write_bytes(np.random.default_rng(1).bytes(3000))
        return "is not a readable safetensors checkpoint"
    if kind == "empty":
        rd.model.write_bytes(b"")
        return "is not a readable safetensors checkpoint"
    if kind == "foreign":
        save_file({"w": torch.zeros(2)}, str(rd.model), metadata={"format": "pt"})
        return "was not written by ood-audit train"
    if kind == "newer_version":
        save_file({"w": torch.zeros(2)}, str(rd.model),
                  metadata={**meta, "format": "ood-audit-checkpoint-2"})
        return "another version of ood-audit"
    if kind == "unknown_model":
        save_file({"w": torch.zeros(2)}, str(rd.model), metadata={**meta, "model": "flow9"})
        return "holds model 'flow9'"
    if kind == "other_model_weights":  # a VAE's weights under a Glow header
        vae = _quick_cfg(tiny_data, epochs=1)
        vae.model = "vae"
        other = train_run(vae, tmp_path / "vae", runs_root=tmp_path, log=lambda m: None)
        from safetensors.torch import load_file

        save_file(load_file(str(RunDir(other.run_dir).model)), str(rd.model), metadata=meta)
        return "does not match a glow model"
    if kind == "damaged_metadata":
        save_file({"w": torch.zeros(2)}, str(rd.model),
                  metadata={**meta, "input_shape": "[1, 8]"})
        return "damaged checkpoint metadata"
    raise AssertionError(kind)


MODEL_DAMAGE = ["truncated", "header_only", "random", "empty", "foreign", "newer_version",
                "unknown_model", "other_model_weights", "damaged_metadata"]


@pytest.mark.parametrize("kind", MODEL_DAMAGE)
def test_damaged_checkpoint_is_one_line_naming_the_file(tiny_run, tiny_data, tmp_path, kind):
    rd = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run, rd.root)
    needle = _replace_model(rd, kind, tmp_path, tiny_data)
    code, _, err = cli(["score", "--run", str(rd.root), "--ood", "noise-uniform",
                        "--limit", "8", "--train-limit", "8", "--device", "cpu"])
    one_error_line(code, err, str(rd.model), needle)
    assert not rd.scores.exists()


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_run, tiny_ood):
    rd = RunDir(tmp_path_factory.mktemp("scored") / "run")
    shutil.copytree(tiny_run, rd.root)
    code, _, err = cli(["score", "--run", str(rd.root), "--ood", "noise-uniform", "--ood",
                        str(tiny_ood), "--limit", "24", "--train-limit", "24", "--device", "cpu"])
    assert code == 0, err
    return rd


def _damage_scores(path: Path, kind: str) -> str:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
        return "is not a readable Parquet file"
    if kind == "empty":
        path.write_bytes(b"")
        return "is not a readable Parquet file"
    if kind == "missing_columns":
        pq.write_table(table.drop(["log_px", "log_pz_level0"]), path)
        return "lacks column(s) log_px, log_pz_level0"
    if kind == "foreign":
        pd.DataFrame({"a": [1]}).to_parquet(path)
        return "was not written by ood-audit score"
    if kind == "other_schema_version":
        meta = {**table.schema.metadata, b"ood_audit.schema_version": b"99"}
        pq.write_table(table.replace_schema_metadata(meta), path)
        return "schema version 99"
    if kind == "damaged_metadata":
        meta = {**table.schema.metadata, b"ood_audit.terms": b"[unclosed"}
        pq.write_table(table.replace_schema_metadata(meta), path)
        return "damaged ood_audit metadata"
    if kind == "no_rows":
        pq.write_table(table.slice(0, 0), path)
        return "holds no rows"
    raise AssertionError(kind)


SCORES_DAMAGE = ["truncated", "empty", "missing_columns", "foreign", "other_schema_version",
                 "damaged_metadata", "no_rows"]


@pytest.mark.parametrize("command", ["decompose", "report"])
@pytest.mark.parametrize("kind", SCORES_DAMAGE)
def test_damaged_scores_parquet_is_one_line_naming_the_file(scored_run, tmp_path, command,
                                                            kind):
    rd = RunDir(tmp_path / "run")
    shutil.copytree(scored_run.root, rd.root)
    needle = _damage_scores(rd.scores / "part-0.parquet", kind)
    argv = (["decompose", "--run", str(rd.root)] if command == "decompose" else
            ["report", str(rd.root), "--n-boot", "0", "--format", "json"])
    code, _, err = cli(argv)
    one_error_line(code, err, str(rd.scores), needle)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(d: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (extra argv for train, what the one error line must hold)."""
    from PIL import Image

    good = blobs(16)
    arrays = {
        "float.npy": good.astype(np.float32), "nan.npy": np.full((4, 8, 8), np.nan),
        "inf.npy": np.full((4, 8, 8), np.inf, np.float32), "rank2.npy": good[0],
        "rank5.npy": good[:2, None, :, :, None], "empty.npy": good[:0],
        "int16.npy": good.astype(np.int16) - 300, "bool.npy": good > 9,
    }
    for name, arr in arrays.items():
        np.save(d / name, arr)
    (d / "random.npy").write_bytes(np.random.default_rng(2).bytes(999))
    (d / "mixed").mkdir()
    Image.fromarray(good[0]).save(d / "mixed" / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(d / "mixed" / "b.png")
    (d / "undecodable").mkdir()
    Image.fromarray(good[0]).save(d / "undecodable" / "a.png")
    (d / "undecodable" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (d / "empty_folder").mkdir()
    yamls = {
        "unknown_key.yaml": "model: glow\ntrain: {epohcs: 2}\n",
        "wrong_type.yaml": "train: {batch_size: eight}\n",
        "float_for_int.yaml": "train: {epochs: 1.5}\n",
        "negative.yaml": "train: {batch_size: -8}\n",
        "zero.yaml": "train: {limit: 0}\n",
        "nan_lr.yaml": "train: {lr: .nan}\n",
        "bad_model_key.yaml": "preset: tiny\nmodel_config: {colour: red}\n",
        "not_a_mapping.yaml": "- glow\n",
        "syntax.yaml": "model: [glow\n",
    }
    for name, text in yamls.items():
        (d / name).write_text(text)
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    data = lambda name, *needles: (["--data", str(d / name)], [str(d / name), *needles])  # noqa: E731
    conf = lambda name, *needles: (["--config", str(d / name)], [name, *needles])  # noqa: E731
    return {
        "float array": data("float.npy", "float32", "uint8"),
        "NaN in float array": data("nan.npy", "NaN or inf"),
        "inf in float array": data("inf.npy", "NaN or inf"),
        "rank 2 array": data("rank2.npy", "shape (8, 8)"),
        "rank 5 array": data("rank5.npy", "shape (2, 1, 8, 8, 1)"),
        "empty array": data("empty.npy", "0 images"),
        "int16 out of range": data("int16.npy", "out of 0..255"),
        "bool array": data("bool.npy", "bool"),
        "random bytes .npy": data("random.npy", "could not read"),
        "mixed image sizes": data("mixed", "b.png", "one size"),
        "undecodable image": (["--data", str(d / "undecodable")],
                              [str(d / "undecodable" / "b.png"), "could not decode"]),
        "empty folder": data("empty_folder", "no image files"),
        "unknown config key": conf("unknown_key.yaml", "'epohcs'"),
        "wrong type in YAML": conf("wrong_type.yaml", "batch_size", "integer"),
        "float for an int": conf("float_for_int.yaml", "epochs", "integer"),
        "negative size": conf("negative.yaml", "batch_size must be positive"),
        "zero size": conf("zero.yaml", "limit must be positive"),
        "NaN learning rate": conf("nan_lr.yaml", "lr must be a positive finite number"),
        "unknown model_config key": conf("bad_model_key.yaml", "'colour'"),
        "YAML not a mapping": conf("not_a_mapping.yaml", "mapping"),
        "YAML syntax error": conf("syntax.yaml", "not valid YAML"),
        "binary YAML": conf("binary.yaml", "not UTF-8"),
        "negative --batch-size": (["--batch-size", "-8"], ["batch_size must be positive"]),
        "zero --epochs": (["--epochs", "0"], ["epochs must be positive"]),
        "zero --limit": (["--limit", "0"], ["limit must be positive"]),
        "infinite --lr": (["--lr", "inf"], ["lr must be a positive finite number"]),
        "negative --seed": (["--seed", "-1"], ["seed must be in 0.."]),
        "huge --seed": (["--seed", str(2**70)], ["seed must be in 0.."]),
        "device meta": (["--device", "meta"], ["unknown device 'meta'"]),
    }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    specs = _bad_inputs(tmp_path_factory.mktemp("bad"))
    assert sorted(specs) == sorted(BAD_INPUT_NAMES)
    return specs


BAD_INPUT_NAMES = [
    "float array", "NaN in float array", "inf in float array", "rank 2 array", "rank 5 array",
    "empty array", "int16 out of range", "bool array", "random bytes .npy",
    "mixed image sizes", "undecodable image", "empty folder", "unknown config key",
    "wrong type in YAML", "float for an int", "negative size", "zero size",
    "NaN learning rate", "unknown model_config key", "YAML not a mapping",
    "YAML syntax error", "binary YAML", "negative --batch-size", "zero --epochs",
    "zero --limit", "infinite --lr", "negative --seed", "huge --seed", "device meta",
]


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_training_input_is_one_line_and_writes_no_run(bad_inputs, tiny_data, tmp_path,
                                                          monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    extra, needles = bad_inputs[name]
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_data), "--preset", "tiny", "--epochs", "1",
            "--limit", "16", "--device", "cpu", "--out", str(out), *extra]
    code, _, err = cli(argv)
    one_error_line(code, err, *needles)
    assert not (out / "model.safetensors").exists() and not (out / "train_state.pt").exists()
    assert not (tmp_path / "runs" / "latest").exists()


def test_bad_ood_set_leaves_the_previous_scores_intact(scored_run, bad_inputs, tmp_path):
    rd = RunDir(tmp_path / "run")
    shutil.copytree(scored_run.root, rd.root)
    before = file_sha256(rd.scores / "part-0.parquet")
    for name in ("NaN in float array", "mixed image sizes", "undecodable image"):
        path = bad_inputs[name][0][1]
        code, _, err = cli(["score", "--run", str(rd.root), "--ood", "noise-uniform",
                            "--ood", path, "--limit", "8", "--train-limit", "8",
                            "--device", "cpu"])
        one_error_line(code, err, Path(path).name)
        assert file_sha256(rd.scores / "part-0.parquet") == before, name  # partial work stays valid
    code, _, err = cli(["decompose", "--run", str(rd.root)])
    assert code == 0, err


def test_out_that_is_a_file_is_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    code, _, err = cli(["train", "--data", str(tiny_data), "--preset", "tiny", "--out",
                        str(tmp_path / "file"), "--device", "cpu"])
    one_error_line(code, err, str(tmp_path / "file"), "is a file")


# ----------------------------------------------------------------------------- numerical trouble


def _nan_after(calls: int):
    """A Glow training_loss that turns NaN from call ``calls`` on."""
    from ood_audit.models.glow import Glow

    real = Glow.training_loss
    count = {"n": 0}

    def loss(self, x):
        count["n"] += 1
        value = real(self, x)
        return value * float("nan") if count["n"] > calls else value

    return loss


def test_single_nan_steps_are_skipped_and_counted(tiny_data, tmp_path, monkeypatch):
    from ood_audit.models.glow import Glow

    real = Glow.training_loss
    calls = {"n": 0}

    def flaky(self, x):
        calls["n"] += 1
        value = real(self, x)
        return value * float("nan") if calls["n"] in (2, 4) else value

    monkeypatch.setattr(Glow, "training_loss", flaky)
    out = train_run(_quick_cfg(tiny_data, epochs=2), tmp_path / "r", runs_root=tmp_path,
                    log=lambda m: None)
    assert [r.nan_skips for r in out.results] == [1, 2]  # cumulative, 2 batches per epoch
    history = pd.read_parquet(RunDir(out.run_dir).metrics)
    assert history["nan_skips"].tolist() == [1, 2]
    load_checkpoint(RunDir(out.run_dir).model)


def test_repeated_nan_stops_with_advice_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path,
                                                                          monkeypatch):
    from ood_audit.models.glow import Glow

    cfg = _quick_cfg(tiny_data, epochs=4, max_bad_steps=3)  # 2 batches per epoch
    monkeypatch.setattr(Glow, "training_loss", _nan_after(2))  # epoch 1 fine, then NaN
    rd = RunDir(tmp_path / "r")
    with pytest.raises(UserError, match=r"diverged at epoch 3 \(3 non-finite steps in a row; "
                                        r"3 steps skipped.*\(epoch 2\) is kept.*lower --lr"):
        train_run(cfg, rd.root, runs_root=tmp_path, log=lambda m: None)
    # The bad run straddled an epoch end: epoch 2 (all NaN) wrote nothing over epoch 1.
    # Weights are unchanged by skipped steps, so the epoch-2 checkpoint equals epoch 1's.
    assert read_metadata(rd.model)["epoch"] == "2"
    model, _ = load_checkpoint(rd.model)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values()
               if t.is_floating_point())
    same_weights(rd.model, rd.epoch_checkpoint(1))


def test_nan_weights_never_overwrite_a_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    """An optimizer step that leaves NaN in the weights with finite loss and gradients
    (too few bad steps to trip max_bad_steps before the epoch ends) still saves nothing."""
    rd = RunDir(tmp_path / "r")
    train_run(_quick_cfg(tiny_data, epochs=1), rd.root, runs_root=tmp_path, log=lambda m: None)
    good = file_sha256(rd.model)
    real_step = torch.optim.Adam.step

    def poisoned(self, *a, **k):
        result = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    code, _, err = cli(["train", "--resume", "--out", str(rd.root), "--epochs", "2"])
    one_error_line(code, err, "diverged at epoch 2", "weights hold NaN or inf", "(epoch 1)")
    assert file_sha256(rd.model) == good
    assert epochs_done(rd) == 1
