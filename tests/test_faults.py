"""Faults of the machine (issue #17): a full disk, a file-size limit, a read-only or
removed folder, memory running out.

Injected for real where that needs no root: a subprocess with a small RLIMIT_FSIZE and
SIGXFSZ ignored (the kernel's EFBIG, on ``train``, ``score`` and one torchrun rank), a
read-only folder (chmod; as root, which ignores permissions, a read-only bind mount in a
private mount namespace: EROFS). Otherwise raised from the real writer with the error
its library raises (pyarrow's OSError, safetensors' SafetensorError, an fsync's ENOSPC),
and memory faults from the model's forward pass.

Every case: exit code 2, exactly one ``error:`` line naming the file or folder, the cause
and what was kept; the previous files byte-identical; no temporary file left; the run's
lock free; and the next command, once the fault is gone, works without clean-up.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_reliability import cli, one_error_line

from ood_audit import faults
from ood_audit.checkpoint import read_metadata
from ood_audit.distributed import DistContext
from ood_audit.errors import UserError
from ood_audit.models.base import DensityModel
from ood_audit.runs import RunDir, run_lock
from ood_audit.scoring.parquet import read_scores

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
SCORE = ["--ood", "noise-uniform", "--limit", "32", "--train-limit", "8", "--batch-size", "16",
         "--device", "cpu"]


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but the lock (its holder's pid changes)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def leftovers(root: Path) -> list[Path]:
    """Temporary files and folders of the atomic writes (``.NAME.*.tmp``, ``.scores.tmp-*``,
    ``.model.safetensors.link``, ``.scores.old-*``)."""
    return [p for p in root.rglob(".*") if p.name != ".lock"]


def assert_clean(rd: RunDir, before: dict[str, str] | None = None) -> None:
    """Nothing left behind, the lock free, and (``before``) the files byte-identical."""
    assert leftovers(rd.root) == []
    with run_lock(rd, "test"):  # raises "in use" if a failed command still held it
        pass
    if before is not None:
        assert snapshot(rd.root) == before


def copy_run(src: Path, dst: Path) -> RunDir:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return RunDir(dst)


def file_size_limit(limit: int):
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG (not SIGXFSZ's kill)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def ood_audit_process(argv: list[str], cwd: Path, limit: int) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "ood_audit", *argv], cwd=cwd, env=ENV,
                         capture_output=True, text=True, timeout=300,
                         preexec_fn=file_size_limit(limit))
    return res.returncode, res.stderr


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_data) -> RunDir:
    """A glow `tiny` run of 2 epochs of one step each: a resume to epoch 3 is quick."""
    from ood_audit.config import RunConfig, TrainConfig
    from ood_audit.training.run import train_run

    root = tmp_path_factory.mktemp("faults")
    cfg = RunConfig(model="glow", preset="tiny", data=str(tiny_data),
                    train=TrainConfig(epochs=2, batch_size=32, limit=32, test_limit=16,
                                      warmup_steps=2, device="cpu"))
    return RunDir(train_run(cfg, root / "small", runs_root=root, log=lambda m: None).run_dir)


@pytest.fixture(scope="module")
def scored(small_run, tmp_path_factory) -> RunDir:
    """A copy of small_run with scores, a decomposition and a JSON report: the previous
    outputs a failed command must keep."""
    rd = copy_run(small_run.root, tmp_path_factory.mktemp("faults") / "scored")
    for argv in (["score", "--run", str(rd.root), *SCORE], ["decompose", "--run", str(rd.root)],
                 ["report", str(rd.root), "--format", "json", "--n-boot", "0"]):
        code, _, err = cli(argv)
        assert code == 0, err
    return rd


@pytest.fixture()
def run_copy(scored, tmp_path) -> RunDir:
    return copy_run(scored.root, tmp_path / "run")


def pyarrow_full_disk(monkeypatch, code: int = errno.ENOSPC, where: str = "") -> None:
    """Parquet writes (pyarrow's, so pandas' too) fail as pyarrow fails on a full disk:
    an OSError with the errno and Arrow's text; ``where``: only files whose path has it."""
    real = pq.ParquetWriter.write_table

    def write_table(self, *args, **kwargs):
        if where in str(getattr(self, "where", "")):
            raise OSError(code, f"Error writing bytes to file. Detail: [errno {code}] "
                                f"{os.strerror(code)}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)


# ----------------------------------------------------------------------------- real EFBIG


def test_score_past_the_file_size_limit_keeps_the_previous_scores(run_copy, tmp_path):
    """The issue's case: a traceback (pyarrow's "Operation on closed file" hid the
    EFBIG) and exit 1, the code of a failed gate."""
    before = snapshot(run_copy.root)
    code, err = ood_audit_process(["score", "--run", str(run_copy.root), *SCORE],
                                  tmp_path, limit=4096)  # the new part-0.parquet is ~20 kB
    one_error_line(code, err, f"cannot write {run_copy.scores / 'part-0.parquet'}: file too large "
                   "(EFBIG", f"previous scores kept ({run_copy.scores} as it was)")
    assert_clean(run_copy, before)
    code, out, err = cli(["score", "--run", str(run_copy.root), *SCORE])  # limit gone: it works
    assert code == 0 and "wrote" in out, err
    assert_clean(run_copy)


def test_train_past_the_file_size_limit_keeps_the_last_checkpoint(small_run, tmp_path):
    rd = copy_run(small_run.root, tmp_path / "run")
    before = snapshot(rd.root)
    argv = ["train", "--resume", "--out", str(rd.root), "--epochs", "3"]
    code, err = ood_audit_process(argv, tmp_path, limit=20_000)  # a checkpoint is ~35 kB
    one_error_line(code, err, f"cannot write {rd.epoch_checkpoint(3)}: file too large (EFBIG",
                   f"last complete checkpoint: epoch 2 ({rd.model}); continue with ood-audit "
                   f"train --resume --out {rd.root}")
    assert_clean(rd, before)
    code, _, err = cli(argv)  # the advice works as given
    assert code == 0, err
    assert read_metadata(rd.model)["epoch"] == "3"
    assert_clean(rd)


# ----------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on device (ENOSPC)"),
                                         (errno.EDQUOT, "disk quota exceeded (EDQUOT)")])
def test_score_on_a_full_disk_keeps_the_previous_scores(run_copy, monkeypatch, code, cause):
    before = snapshot(run_copy.root)
    with monkeypatch.context() as m:
        pyarrow_full_disk(m, code)
        code_, _, err = cli(["score", "--run", str(run_copy.root), *SCORE])
    one_error_line(code_, err, f"cannot write {run_copy.scores / 'part-0.parquet'}: {cause}",
                   "previous scores kept")
    assert_clean(run_copy, before)
    code_, _, err = cli(["score", "--run", str(run_copy.root), *SCORE])
    assert code_ == 0, err


def _torch_save_full_disk(obj, f, *args, **kwargs):
    """torch.save into a file on a full disk: the write's OSError."""
    f.write(b"PK\3\4")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["metrics", "train_state"])
def test_train_on_a_full_disk_after_the_checkpoint(small_run, tmp_path, monkeypatch, writer):
    """After epoch 3's checkpoint (whose own write failing is the EFBIG test above), its
    metrics.parquet, then its train_state.pt: the files not yet replaced are kept."""
    rd = copy_run(small_run.root, tmp_path / "run")
    before = snapshot(rd.root)
    argv = ["train", "--resume", "--out", str(rd.root), "--epochs", "3"]
    with monkeypatch.context() as m:
        if writer == "train_state":
            m.setattr(torch, "save", _torch_save_full_disk)
        else:
            pyarrow_full_disk(m)
        code, _, err = cli(argv)
    failing = rd.metrics if writer == "metrics" else rd.train_state
    one_error_line(code, err, f"cannot write {failing}: no space left on device (ENOSPC)",
                   f"last complete checkpoint: epoch 3 ({rd.model})",
                   f"continue with ood-audit train --resume --out {rd.root}")
    kept = {k: before[k] for k in ("train_state.pt", "metrics.parquet")[:2 if writer == "metrics" else 1]}
    assert_clean(rd)
    assert {k: v for k, v in snapshot(rd.root).items() if k in kept} == kept
    code, _, err = cli(argv)
    assert code == 0, err
    assert read_metadata(rd.model)["epoch"] == "3" and len(pd.read_parquet(rd.metrics)) == 3


def test_decompose_on_a_full_disk_keeps_the_previous_table(run_copy, monkeypatch):
    before = snapshot(run_copy.root)
    with monkeypatch.context() as m:
        pyarrow_full_disk(m)
        code, _, err = cli(["decompose", "--run", str(run_copy.root)])
    one_error_line(code, err, f"cannot write {run_copy.decomposition}: no space left on device",
                   "previous decomposition.parquet kept")
    assert_clean(run_copy, before)
    code, _, err = cli(["decompose", "--run", str(run_copy.root)])
    assert code == 0, err


def test_report_whose_fsync_finds_the_disk_full_keeps_the_previous_report(run_copy, monkeypatch):
    """Many file systems report ENOSPC only when the data is flushed (delayed allocation)."""
    before = snapshot(run_copy.root)
    argv = ["report", str(run_copy.root), "--format", "json", "--n-boot", "0"]
    with monkeypatch.context() as m:
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        m.setattr(os, "fsync", fsync)
        code, _, err = cli(argv)
    one_error_line(code, err, f"cannot write {run_copy.report / 'summary.json'}: no space left",
                   "previous summary.json kept")
    assert_clean(run_copy, before)
    code, _, err = cli(argv)
    assert code == 0, err


# ----------------------------------------------------------------------------- folders


def _read_only_cli(folder: Path, argv: list[str], cwd: Path) -> tuple[int, str]:
    """``ood-audit argv`` with ``folder`` read-only: chmod for a user; as root, which
    ignores permissions, a read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            code, _, err = cli(argv)
        finally:
            folder.chmod(mode)
        return code, err
    if shutil.which("unshare") is None:
        pytest.skip("running as root, which ignores chmod, without unshare for a read-only mount")
    q = f"'{folder}'"
    script = (f"mount --bind {q} {q} && mount -o remount,bind,ro {q} {q} || exit 99; "
              f"exec '{sys.executable}' -m ood_audit \"$@\"")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                          "sh", *argv], cwd=cwd, env=ENV, capture_output=True, text=True,
                         timeout=300)
    if res.returncode == 99 or "unshare failed" in res.stderr:
        pytest.skip(f"running as root, which ignores chmod, and cannot mount read-only here: "
                    f"{res.stderr.strip()[:200]}")
    return res.returncode, res.stderr


def test_score_in_a_read_only_run_folder_changes_nothing(run_copy, tmp_path):
    before = snapshot(run_copy.root)
    code, err = _read_only_cli(run_copy.root, ["score", "--run", str(run_copy.root), *SCORE],
                               tmp_path)
    line = one_error_line(code, err, str(run_copy.root))
    # a user: the lock opens, the scores folder cannot be made; root's read-only mount
    # refuses the lock file already
    assert (f"cannot write {run_copy.scores}: permission denied (EACCES); previous scores kept"
            in line) or (f"cannot lock {run_copy.lock}: read-only file system (EROFS); "
                         "nothing was changed" in line), line
    assert_clean(run_copy, before)
    code, _, err = cli(["score", "--run", str(run_copy.root), *SCORE])
    assert code == 0, err


def test_run_folder_removed_while_scoring(run_copy, monkeypatch):
    """The scores are finished in a temporary folder next to RUN/scores; someone removes
    it (or the whole run) before they are published."""
    from ood_audit.scoring import writer

    real = writer.ScoresWriter.close

    def close_then_remove(self):
        real(self)
        shutil.rmtree(Path(self.writer.where).parent)

    with monkeypatch.context() as m:
        m.setattr(writer.ScoresWriter, "close", close_then_remove)
        code, _, err = cli(["score", "--run", str(run_copy.root), *SCORE])
    one_error_line(code, err, f"cannot write {run_copy.scores}: no such file or folder (ENOENT, "
                   "removed while running?)", "previous scores kept")
    assert_clean(run_copy)
    code, _, err = cli(["score", "--run", str(run_copy.root), *SCORE])
    assert code == 0, err


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate "
                 "memory)"),
], ids=["MemoryError", "torch-cpu-allocator"])
def test_out_of_memory_while_scoring_is_one_line(run_copy, monkeypatch, error):
    before = snapshot(run_copy.root)
    real = DensityModel.score_columns

    def score_columns(self, x):
        if len(x) > 1:  # past the one-image probe of the columns: mid-scoring
            raise error
        return real(self, x)

    with monkeypatch.context() as m:
        m.setattr(DensityModel, "score_columns", score_columns)
        code, _, err = cli(["score", "--run", str(run_copy.root), *SCORE])
    one_error_line(code, err, "out of memory", "previous scores kept", "smaller --batch-size")
    assert_clean(run_copy, before)


def _gpu_holds(monkeypatch, most: int) -> list[int]:
    """The model's forward pass raises CUDA's out-of-memory error for batches of more
    than ``most`` images (the error type exists on CPU builds too); returns the sizes tried."""
    real = DensityModel.score_columns
    tried: list[int] = []

    def score_columns(self, x):
        tried.append(len(x))
        if len(x) > most:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, x)

    monkeypatch.setattr(DensityModel, "score_columns", score_columns)
    return tried


def test_cuda_out_of_memory_halves_the_batch_and_scores_the_same(run_copy, tmp_path, monkeypatch):
    plain = copy_run(run_copy.root, tmp_path / "plain")
    # sets of 32, 8 and 32 images: 32 fails, 16 fails, 8 fits, as in the plain run
    argv = ["--ood", "noise-uniform", "--limit", "32", "--train-limit", "8", "--device", "cpu"]
    code, _, err = cli(["score", "--run", str(plain.root), *argv, "--batch-size", "8"])
    assert code == 0, err
    with monkeypatch.context() as m:
        tried = _gpu_holds(m, most=8)
        code, _, err = cli(["score", "--run", str(run_copy.root), *argv, "--batch-size", "32"])
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if "CUDA out of memory" in ln]
    assert len(notes) == 1 and "scoring 16 at a time" in notes[0], err  # said once
    assert 32 in tried and 16 in tried and max(tried[tried.index(8):]) == 8  # stayed down
    a, _ = read_scores(plain.scores)
    b, _ = read_scores(run_copy.scores)
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # row for row, bit for bit


def test_cuda_out_of_memory_at_one_image_stops_with_advice(run_copy, monkeypatch):
    before = snapshot(run_copy.root)
    with monkeypatch.context() as m:
        _gpu_holds(m, most=0)
        # the one-image probe of the columns fails too: no columns, no scores
        code, _, err = cli(["score", "--run", str(run_copy.root), *SCORE])
    one_error_line(code, err, "out of GPU memory", "previous scores kept", "--device cpu")
    assert_clean(run_copy, before)


# ----------------------------------------------------------------------------- ood-audit run


def test_run_with_a_full_disk_at_the_score_step_continues_from_it(tiny_data, tiny_ood, tmp_path,
                                                                   monkeypatch):
    spec = {"name": "tiny", "out": str(tmp_path / "exp"),
            "train": {"model": "glow", "preset": "tiny", "data": str(tiny_data),
                      "train": {"epochs": 1, "batch_size": 32, "limit": 64, "test_limit": 32,
                                "warmup_steps": 5, "device": "cpu"}},
            "score": {"ood": [str(tiny_ood)], "limit": 32, "train_limit": 16},
            "report": {"formats": "json", "n_boot": 0}}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(spec))
    with monkeypatch.context() as m:
        pyarrow_full_disk(m, where="part-")  # the train step's metrics.parquet is written
        code, _, err = cli(["run", str(path)])
    one_error_line(code, err, "part-0.parquet: no space left on device (ENOSPC)",
                   "no scores written", "the steps before this score step are done",
                   "the same ood-audit run continues from it")
    exp = tmp_path / "exp"
    for folder in [exp, *exp.iterdir()]:
        if folder.is_dir() and (folder / ".lock").exists():
            assert_clean(RunDir(folder))
    code, out, err = cli(["run", str(path)])
    assert code == 0, err
    assert "1 skipped" in out, out  # the train step was not redone


# ----------------------------------------------------------------------------- torchrun


RANK1_LIMITED = """\
import os, resource, signal, sys
if os.environ.get("RANK") == "1":  # only this rank's writes are limited
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
from ood_audit.cli.app import main
main(sys.argv[1:])
"""


def test_a_sharded_rank_past_the_file_size_limit_stops_every_rank(run_copy, tmp_path):
    """torchrun with 2 gloo ranks; rank 1 cannot write its part: both ranks stop with the
    same line, and the previous table stays (no partial table is published)."""
    before = snapshot(run_copy.root)
    script = tmp_path / "rank1_limited.py"
    script.write_text(RANK1_LIMITED)
    # 2 chunks of 1024 images of noise: one per rank
    argv = ["score", "--run", str(run_copy.root), "--ood", "noise-uniform", "--limit", "2048",
            "--train-limit", "0", "--batch-size", "256", "--device", "cpu"]
    logs = tmp_path / "logs"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "--redirects", "2", "--log-dir", str(logs),
                          # "--": else torchrun takes score's --run for its --run-path
                          "--", str(script), *argv], env=ENV, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    ranks = sorted(logs.rglob("stderr.log"), key=lambda p: p.parent.name)  # .../<rank>/stderr.log
    assert [p.parent.name for p in ranks] == ["0", "1"], res.stderr[-3000:]
    lines = [one_error_line(2, p.read_text()) for p in ranks]  # one line each, no traceback
    assert lines[0] == lines[1], lines
    assert (f"cannot write {run_copy.scores / 'part-1.parquet'}: file too large (EFBIG"
            in lines[0]), lines[0]
    assert f"previous scores kept ({run_copy.scores} as it was)" in lines[0], lines[0]
    assert_clean(run_copy, before)


# ----------------------------------------------------------------------------- the boundary


def _raised(make) -> BaseException:
    try:
        make()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing raised")


def test_the_boundary_finds_the_fault_a_library_wrapped():
    def closed_after_full_disk():
        try:
            raise OSError(errno.ENOSPC, "Error writing bytes to file")
        finally:
            raise ValueError("Operation on closed file")  # pyarrow's ArrowInvalid is one

    def bug_after_handling():
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError:
            raise KeyError("x") from None  # a suppressed context is not the cause

    exc = _raised(closed_after_full_disk)
    faults.annotate(exc, path="RUN/scores/part-0.parquet")
    faults.annotate(exc, kept="previous scores kept")
    assert faults.describe(exc) == ("cannot write RUN/scores/part-0.parquet: no space left on "
                                    "device (ENOSPC); previous scores kept")
    rust = RuntimeError("Error while serializing: I/O error: File too large (os error 27)")
    assert faults.describe(rust).startswith("file too large (EFBIG")
    assert faults.describe(_raised(bug_after_handling)) is None
    assert faults.describe(ValueError("no file here")) is None  # a bug keeps its traceback
    assert faults.describe(FileNotFoundError(errno.ENOENT, "No such file", "x.npy")) == (
        "cannot use x.npy: no such file or folder (ENOENT, removed while running?)")



class _Rank1Of2(DistContext):
    """Rank 1 of 2 whose all-gather hands back what rank 0 sent (no process group)."""

    def __init__(self, from_rank0):
        super().__init__(rank=1, world=2)
        self.from_rank0 = from_rank0

    def all_gather_object(self, obj):
        return [self.from_rank0, obj]


def test_ranks_agree_on_rank_0s_line():
    """What every rank does when rank 0's write fails (torchrun scoring, DDP training's
    checkpoint): the same line, with this rank's own note of what was kept."""
    full = OSError(errno.ENOSPC, "No space left on device")
    faults.annotate(full, path="RUN/model.safetensors")
    sent = _Rank1Of2(None)
    sent.all_gather_object = lambda obj: [obj, None]  # rank 0's view: what it sent
    with pytest.raises(OSError) as raised:
        sent.agree(full)  # the failed rank raises its own error
    line = faults.what_failed(raised.value)

    rank1 = _Rank1Of2(("fault", *line))
    with pytest.raises(faults.PeerFault) as peer:
        with faults.keeping("last complete checkpoint: epoch 2"):
            rank1.agree(None)
    assert faults.describe(peer.value) == ("cannot write RUN/model.safetensors: no space left on "
                                           "device (ENOSPC); last complete checkpoint: epoch 2")
    with pytest.raises(UserError, match="^--ood mnist is given twice$"):
        _Rank1Of2(("user", "--ood mnist is given twice", None)).agree(None)
    with pytest.raises(UserError, match="rank 0 of 2 stopped: KeyError"):
        _Rank1Of2(("bug", "KeyError: 'x'", None)).agree(None)
    _Rank1Of2(None).agree(None)  # nobody failed: on it goes
