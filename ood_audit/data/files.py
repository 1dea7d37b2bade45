"""The one-line errors of data sets read from files, and downloads through torchvision.

Every loader that reads a data set's own files says, when they are missing, exactly
which files it expected where under the data root and how to get them; when they are
unreadable, which file and that it looks truncated or corrupt. Both are
:class:`~ood_audit.errors.UserError` (one line, exit code 2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError

#: What a user file may be: an array file, or a folder of images with these suffixes.
ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
ROOT_HINT = "pass --data-root DIR or set OOD_AUDIT_DATA"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def missing(name: str, split: str, expected: str, *, download: bool | str = True) -> UserError:
    """``name split not found: expected EXPECTED; pass --data-root ... [or add --download]``.

    ``download``: True when ``--download`` can fetch the set, else a sentence saying
    where to get it.
    """
    how = ", or add --download" if download is True else f"; {download}" if download else ""
    return UserError(f"{name} {split} not found: expected {expected}; {ROOT_HINT} to the "
                     f"folder holding it{how}")


def corrupt(name: str, path: Path, exc: BaseException | str, *,
            download: bool = True) -> UserError:
    detail = exc if isinstance(exc, str) else one_line(exc)
    again = "copy it again, or delete it and add --download" if download else "copy it again"
    return UserError(f"{name}: {path} could not be read ({detail}): it looks truncated or "
                     f"corrupt; {again}")


def tv_download(name: str, where: Path, fetch: Callable[[], object]) -> None:
    """Run ``fetch`` (a torchvision dataset built with ``download=True``, which downloads,
    checks the archive's md5 and extracts into torchvision's layout); any failure becomes
    one line."""
    try:
        fetch()
    except Exception as exc:  # URLError, OSError, RuntimeError, gdown's own errors...
        raise UserError(f"could not download {name} into {where} ({one_line(exc)}): check the "
                        "network, or put the files there yourself and drop --download") from None
