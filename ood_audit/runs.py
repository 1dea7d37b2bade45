"""The run directory: its layout, the ``latest`` pointer, atomic writes and a lock.

Every subcommand reads and writes a run directory; nothing passes between commands
except files in it::

    runs/<name>/
      config.yaml                 resolved config
      model.safetensors           latest weights (+ header metadata)
      checkpoints/epoch-NNNN.safetensors
      train_state.pt              optimizer, scheduler, RNG, data order (for --resume)
      metrics.parquet             one row per epoch
      scores.parquet              one row per scored image
      decomposition.parquet
      over_training.parquet       term means per epoch checkpoint (decompose --over-training)
      report/
    runs/latest                   text file naming the last run trained
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

RUNS_ROOT = Path("runs")
LATEST = "latest"


class RunDir:
    """Paths inside one run directory."""

    def __init__(self, root: Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    model = property(lambda self: self.root / "model.safetensors")
    checkpoints = property(lambda self: self.root / "checkpoints")
    train_state = property(lambda self: self.root / "train_state.pt")
    metrics = property(lambda self: self.root / "metrics.parquet")
    scores = property(lambda self: self.root / "scores.parquet")
    decomposition = property(lambda self: self.root / "decomposition.parquet")
    over_training = property(lambda self: self.root / "over_training.parquet")
    report = property(lambda self: self.root / "report")
    lock = property(lambda self: self.root / ".lock")

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:04d}.safetensors"

    def epoch_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints.glob("epoch-*.safetensors"))

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


def new_run_name(model: str, data: str) -> str:
    """A fresh, sortable run name such as ``glow-fashionmnist-20261128-161500``."""
    import time

    return f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def set_latest(run: Path, runs_root: Path = RUNS_ROOT) -> None:
    """Point ``runs/latest`` at ``run`` (a text file, so it works on every OS)."""
    runs_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(runs_root / LATEST, str(Path(run).resolve()) + "\n")


def resolve_run(run: Path | None, runs_root: Path = RUNS_ROOT, need_model: bool = True) -> RunDir:
    """The run a command works on: ``run`` if given, else the one ``runs/latest`` names."""
    if run is None:
        pointer = runs_root / LATEST
        if not pointer.exists():
            raise UserError(
                f"no run given and no {pointer} pointer: train one first "
                "(ood-audit train --model glow --data fashionmnist) or pass --run DIR"
            )
        run = Path(pointer.read_text().strip())
    rd = RunDir(Path(run))
    if not rd.root.is_dir():
        raise UserError(f"run directory {rd.root} does not exist: name the folder of a trained "
                        "run (ood-audit train writes runs/<model>-<data>-<time>)")
    if need_model and not rd.model.exists():
        raise UserError(
            f"{rd.root} holds no model.safetensors: is it a run directory? "
            "Train first, or resume with ood-audit train --resume --out DIR"
        )
    return rd


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's is 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``.

    A reader never sees a half-written file, even if the process dies mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write to; renamed over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:  # flush what the caller's library wrote
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def run_lock(rd: RunDir, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the run directory so two writers never interleave."""
    import fcntl

    rd.root.mkdir(parents=True, exist_ok=True)
    fh = open(rd.lock, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(
                f"{rd.root} is in use by {holder}; wait for it to finish or use another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} ({what})")
        fh.flush()
        yield
    finally:
        fh.close()
