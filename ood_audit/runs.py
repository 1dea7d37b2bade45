"""The run directory: its layout, the ``latest`` pointer, atomic writes and a lock.

Every subcommand reads and writes a run directory; nothing passes between commands
except files in it::

    runs/<name>/
      config.yaml                 resolved config
      model.safetensors           latest weights (+ header metadata)
      checkpoints/epoch-NNNN.safetensors
      train_state.pt              optimizer, scheduler, RNG, data order (for --resume)
      metrics.parquet             one row per epoch
      scores/part-<rank>.parquet  one row per scored image (one part per torchrun rank;
                                  an older run's single scores.parquet is still read)
      ensemble.json               only in an ensemble folder: {"members": ["seed-0", ...]}
      decomposition.parquet
      over_training.parquet       term means per epoch checkpoint (decompose --over-training)
      second_order.json           predicted vs measured OOD gap (decompose --second-order)
      pixel_maps.npz              per-pixel log-likelihood of a few images (PixelCNN++)
      report/
    runs/latest                   text file naming the last run trained
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError
from .faults import keeping, writing

RUNS_ROOT = Path("runs")
LATEST = "latest"
ENSEMBLE_FILE = "ensemble.json"
BACKGROUND_DIR = "background"


class RunDir:
    """Paths inside one run directory."""

    def __init__(self, root: Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    ensemble = property(lambda self: self.root / ENSEMBLE_FILE)
    checkpoints = property(lambda self: self.root / "checkpoints")
    train_state = property(lambda self: self.root / "train_state.pt")
    metrics = property(lambda self: self.root / "metrics.parquet")
    scores = property(lambda self: self.root / "scores")  # folder of part-<rank>.parquet
    legacy_scores = property(lambda self: self.root / "scores.parquet")  # before sharding
    decomposition = property(lambda self: self.root / "decomposition.parquet")
    over_training = property(lambda self: self.root / "over_training.parquet")
    second_order = property(lambda self: self.root / "second_order.json")
    pixel_maps = property(lambda self: self.root / "pixel_maps.npz")
    report = property(lambda self: self.root / "report")
    lock = property(lambda self: self.root / ".lock")

    @property
    def background(self) -> RunDir:
        """``RUN/background``: the run's background model (likelihood ratio), a nested run."""
        return RunDir(self.root / BACKGROUND_DIR)

    @property
    def model(self) -> Path:
        """The run's weights; in an ensemble folder, member 0's (outputs stay in the folder)."""
        members = self.ensemble_members()
        return (members[0] if members else self.root) / "model.safetensors"

    def ensemble_members(self) -> list[Path]:
        """Member run folders named by ``ensemble.json`` (relative to the folder), member 0
        first; [] when this is not an ensemble folder."""
        if not self.ensemble.is_file():
            return []
        try:
            members = json.loads(self.ensemble.read_text())["members"]
            if not members or not all(isinstance(m, str) for m in members):
                raise ValueError("members must be a non-empty list of folder names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.ensemble} is damaged ({exc}); it should read "
                            '{"members": ["seed-0", "seed-1", ...]}') from None
        return [self.root / m for m in members]

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:04d}.safetensors"

    def epoch_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints.glob("epoch-*.safetensors"))

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


def new_run_name(model: str, data: str) -> str:
    """A fresh, sortable run name such as ``glow-fashionmnist-20261128-161500``."""
    return f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def set_latest(run: Path, runs_root: Path = RUNS_ROOT) -> None:
    """Point ``runs/latest`` at ``run`` (a text file, so it works on every OS)."""
    atomic_write_text(runs_root / LATEST, str(Path(run).resolve()) + "\n")


def resolve_run(run: Path | None, runs_root: Path = RUNS_ROOT, need_model: bool = True) -> RunDir:
    """The run a command works on: ``run`` if given, else the one ``runs/latest`` names."""
    if run is None:
        pointer = runs_root / LATEST
        if not pointer.exists():
            raise UserError(
                f"no run given and no {pointer} pointer: train one first "
                "(ood-audit train --model glow --data fashionmnist) or name the run directory"
            )
        run = Path(pointer.read_text().strip())
    rd = RunDir(Path(run))
    if not rd.root.is_dir():
        raise UserError(f"run directory {rd.root} does not exist: name the folder of a trained "
                        "run (ood-audit train writes runs/<model>-<data>-<time>)")
    if need_model and rd.ensemble_members() and not rd.model.exists():
        raise UserError(f"{rd.ensemble} names member {rd.ensemble_members()[0].name}, which holds no "
                        "model.safetensors: finish training the ensemble first")
    if need_model and not rd.model.exists():
        raise UserError(
            f"{rd.root} holds no model.safetensors: is it a run directory? "
            "Train first, or resume with ood-audit train --resume --out DIR"
        )
    return rd


def ensure_dir(folder: Path, what: str = "folder") -> None:
    """Create ``folder`` (and parents), or a UserError when a file is in the way. The file
    system's refusal (no permission, a read-only disk) propagates as its OSError, marked
    as creating ``folder`` for the CLI's one line (:mod:`ood_audit.faults`)."""
    folder = Path(folder)
    if folder.is_dir():
        return
    if folder.exists():
        raise UserError(f"{folder} is a file, not a {what}: name a folder")
    # A refusal (no permission, read-only, full) is a fault of the machine: the CLI's
    # error boundary (ood_audit.faults) makes its line, naming this folder.
    with writing(folder, "create", existed=False):
        folder.mkdir(parents=True, exist_ok=True)


def _temp_in(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` (same file system, so the rename is atomic)."""
    ensure_dir(path.parent)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (power loss); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    with writing(path):  # a fault's line names path, not the temporary name
        fd, tmp = _temp_in(path)
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
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write to; renamed over ``path`` only on success."""
    path = Path(path)
    # The caller's library writes in the block: its errors (pyarrow's, safetensors') are
    # marked as writing ``path`` too, and the temporary file goes however the block ends.
    with writing(path):
        fd, tmp = _temp_in(path)
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
    _fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final`` (same parent), replacing what is there.

    POSIX cannot rename a folder over a non-empty one, so the old one is renamed aside
    first and deleted after: a reader sees the old table or the new one, or (for the
    instant between the two renames) none, never a mixture of parts.
    """
    tmp, final = Path(tmp), Path(final)
    with writing(final, existed=final.exists()):
        for f in tmp.iterdir():  # the parts' bytes are on disk before the folder appears
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    had_old = final.exists() or final.is_symlink()
    with writing(final, existed=had_old):
        if had_old:
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):  # put the old one back: nothing lost
                os.replace(old, final)
            raise
    _fsync_dir(final.parent)
    if had_old:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


@contextlib.contextmanager
def run_lock(rd: RunDir, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the run directory so two writers never interleave.

    The lock is an ``flock`` on ``RUN/.lock``, released by the kernel when the process
    ends however it ends (even SIGKILL), so a stale file never blocks a later run. The
    file names the holder (``pid N (what)``) for the second process's message.
    """
    ensure_dir(rd.root, "run directory")
    with writing(rd.lock, "lock", existed=False), keeping("nothing was changed"):
        fh = open(rd.lock, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise _in_use(rd, fh.read()) from None
        with writing(rd.lock, "lock", existed=False), keeping("nothing was changed"):
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} ({what})")
            fh.flush()
        yield
    finally:
        fh.close()


def refuse_if_locked(rd: RunDir) -> None:
    """Raise the "in use" UserError now if another process holds ``rd``'s lock.

    Creates nothing: a command calls it before its own checks, so a second ``train`` on
    a busy run says who holds it rather than "already holds a run".
    """
    if not rd.lock.is_file():
        return
    try:
        fh = open(rd.lock)
    except OSError:
        return  # run_lock will say why it cannot open the file
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(rd, fh.read()) from None
        # the probe lock goes with the file's closing


def _in_use(rd: RunDir, holder: str) -> UserError:
    return UserError(f"{rd.root} is in use by {holder.strip() or 'another process'}; wait "
                     "for it to finish, or use another --out")
