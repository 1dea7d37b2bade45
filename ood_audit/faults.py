"""Faults of the machine: a full disk, a file-size limit, a read-only or vanished folder,
memory running out. One line and exit code 2, saying the file, the cause and what was kept.

Writers do not catch these. They mark what they are writing (:func:`writing`, used by
:mod:`ood_audit.runs`' atomic writes, so every command's files are covered) and a command
marks what a failure keeps (:func:`keeping`): both are notes on the exception passing
through, read once at the CLI's error boundary by :func:`describe`. The boundary finds
the fault under whatever a library wrapped it in: pyarrow's ``Operation on closed file``
raised while the failed write is handled, safetensors' ``SafetensorError`` naming ``os
error 28``, torch's allocator ``RuntimeError``. A new command gets all of this by writing
through :mod:`ood_audit.runs` and being called by ``main()``.

This module imports nothing heavy (no torch, no pyarrow): it runs on the error path.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: errno -> the cause in words and a hint, as the line gives them. A chained OSError (one a library
#: wrapped) counts as a fault of the machine only with one of these; a bare OSError
#: with any errno does (the file system refused, whatever the reason).
CAUSES = {
    errno.ENOSPC: ("no space left on device", None),
    errno.EDQUOT: ("disk quota exceeded", None),
    errno.EFBIG: ("file too large", "over the file-size limit: ulimit -f"),
    errno.EROFS: ("read-only file system", None),
    errno.EACCES: ("permission denied", None),
    errno.EPERM: ("operation not permitted", None),
    errno.ENOENT: ("no such file or folder", "removed while running?"),
    errno.ENOTDIR: ("not a folder", "a file is where a folder must be"),
    errno.EIO: ("input/output error", "a failing disk or network file system"),
    errno.ENOMEM: ("out of memory", None),
}
#: Where the errno hides in the text of errors that do not carry it as an attribute:
#: Rust's io::Error ("(os error 28)", safetensors) and Arrow's ("[errno 28]").
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[errno (\d+)\]", re.IGNORECASE)
#: torch's CPU allocator raises a RuntimeError, not MemoryError.
_CPU_ALLOC = "DefaultCPUAllocator: can't allocate memory"
_NOTE = "_ood_audit_fault"  # the attribute holding an exception's notes


@dataclass
class Fault:
    """What went wrong, found in an exception's chain."""

    kind: str  # "disk" | "memory" | "gpu-memory"
    cause: str  # in words, with the errno's name for a disk fault
    path: Path | None = None  # from the OSError itself (a read, a mkdir)


class PeerFault(Exception):
    """Another rank of a torchrun group hit a fault: this rank stops with its line.

    ``what`` is that rank's description (file and cause); the kept part is added by
    this rank's own :func:`keeping` contexts, the same on every rank."""

    def __init__(self, what: str, advice: str | None = None):
        super().__init__(what)
        self.what, self.advice = what, advice


def _notes(exc: BaseException) -> dict:
    notes = getattr(exc, _NOTE, None)
    if notes is None:
        notes = {"kept": []}
        try:
            setattr(exc, _NOTE, notes)
        except (AttributeError, TypeError):  # an exception type with __slots__: no notes
            pass
    return notes


def annotate(exc: BaseException, *, path: Path | str | None = None, op: str | None = None,
             default_kept: str | None = None, kept: str | Callable[[], str | None] | None = None,
             advice: str | None = None) -> None:
    """Note on ``exc`` what was being done when it passed. The innermost file (``path``,
    ``op``, ``default_kept``) wins; every ``kept`` is kept, inner first."""
    notes = _notes(exc)
    if path is not None and "path" not in notes:
        notes.update(path=Path(path), op=op or "write", default_kept=default_kept)
    if kept is not None:
        notes["kept"].append(kept)
    if advice is not None:
        notes.setdefault("advice", advice)


@contextlib.contextmanager
def writing(path: Path | str, op: str = "write", *, existed: bool | None = None) -> Iterator[None]:
    """Mark an exception raised in the block as raised while writing ``path`` (the file a
    user knows, not a temporary name). ``existed``: whether ``path`` was there before, so
    the line can say the previous one was kept (None: looked up now)."""
    path = Path(path)
    if existed is None:
        try:
            existed = path.exists()
        except OSError:  # a folder that cannot even be searched: the block will say so
            existed = False
    try:
        yield
    except BaseException as exc:
        annotate(exc, path=path, op=op,
                 default_kept=f"previous {path.name} kept" if existed else None)
        raise


@contextlib.contextmanager
def keeping(kept: str | Callable[[], str | None]) -> Iterator[None]:
    """Say what a failure in the block keeps: a string, or a function called when the line
    is made (after clean-up, so it can look at the files as they are)."""
    try:
        yield
    except BaseException as exc:
        annotate(exc, kept=kept)
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling (not a suppressed context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        if exc.__cause__ is not None:
            exc = exc.__cause__
        elif not exc.__suppress_context__:
            exc = exc.__context__
        else:
            break


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        return exc.errno
    match = _ERRNO_IN_TEXT.search(str(exc))
    return int(match.group(1) or match.group(2)) if match else None


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _as_fault(exc: BaseException, top: bool) -> Fault | None:
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _CPU_ALLOC in str(exc)):
        return Fault("memory", f"out of memory ({_first_line(exc)})")
    if type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch"):
        return Fault("gpu-memory", f"out of GPU memory ({_first_line(exc)})")
    code = _errno_of(exc)
    if code == errno.ENOMEM:
        return Fault("memory", f"out of memory ({_first_line(exc)})")
    if code in CAUSES or (top and isinstance(exc, OSError)):
        if code in CAUSES:
            words, hint = CAUSES[code]
            cause = f"{words} ({errno.errorcode[code]}{', ' + hint if hint else ''})"
        else:
            cause = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                     else _first_line(exc))
        names = [str(n) for n in (getattr(exc, "filename", None), getattr(exc, "filename2", None)) if n]
        return Fault("disk", cause, Path(names[0]) if names else None)
    return None


def find_fault(exc: BaseException) -> Fault | None:
    """The fault of the machine in ``exc``'s chain, or None when it is something else."""
    if isinstance(exc, PeerFault):
        return Fault("peer", exc.what)
    for i, link in enumerate(_chain(exc)):
        fault = _as_fault(link, top=i == 0)
        if fault is not None:
            return fault
    return None


def what_failed(exc: BaseException) -> tuple[str, str | None] | None:
    """(file and cause, advice) of a fault, or None: the part of the line every rank of a
    torchrun group shares (:class:`PeerFault`)."""
    if isinstance(exc, PeerFault):
        return exc.what, exc.advice
    fault = find_fault(exc)
    if fault is None:
        return None
    notes: dict = {}
    for link in _chain(exc):  # the notes may sit on a wrapper or on what it wraps
        for key, value in getattr(link, _NOTE, {}).items():
            if key != "kept":
                notes.setdefault(key, value)
    advice = notes.get("advice")
    if fault.kind == "disk":
        path = notes.get("path") or fault.path
        verb = {"write": "cannot write", "create": "cannot create", "lock": "cannot lock"}.get(
            notes.get("op", ""), "cannot use")
        return (f"{verb} {path}: {fault.cause}" if path else fault.cause), advice
    if fault.kind == "gpu-memory":
        return fault.cause, advice or "use a smaller --batch-size, or --device cpu"
    return fault.cause, advice or "use a smaller --batch-size or --limit, or free memory"


def kept_of(exc: BaseException) -> str | None:
    """What the failure kept, from the notes of :func:`keeping` (inner first; the
    writer's "previous FILE kept" when no command said more)."""
    kept: list[str] = []
    default = None
    for link in reversed(list(_chain(exc))):  # deepest first: inner contexts first
        notes = getattr(link, _NOTE, None) or {}
        default = default or notes.get("default_kept")
        for item in notes.get("kept", []):
            try:
                text = item() if callable(item) else item
            except Exception:  # noqa: BLE001 - the line matters more than this part of it
                text = None
            if text and text not in kept:
                kept.append(text)
    return "; ".join(kept) if kept else default


def describe(exc: BaseException) -> str | None:
    """The one line for a fault of the machine in ``exc`` (without ``error:``), or None:
    the file and the cause, what was kept, what to do."""
    failed = what_failed(exc)
    if failed is None:
        return None
    what, advice = failed
    return "; ".join(part for part in (what, kept_of(exc), advice) if part)
