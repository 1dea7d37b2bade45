"""Loaders for the data sets torchvision reads from its raw on-disk layout.

MNIST, Fashion-MNIST and Kuzushiji-MNIST are read with ``torchvision.datasets.MNIST`` /
``FashionMNIST`` / ``KMNIST`` from ``ROOT/<Class>/raw/`` (uncompressed IDX files), using the dataset's ``.data`` and
``.targets`` tensors directly: no per-item PIL decoding. Missing files, failed
downloads and unreadable files become one-line :class:`~ood_audit.errors.UserError`
messages naming the folder looked in.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .images import ImageSet


def load_mnist(split: str, *, root: Path, download: bool = False, limit: int | None = None,
               **_: object) -> ImageSet:
    """MNIST digits, uint8 [N, 1, 28, 28], labels 0..9."""
    from torchvision.datasets import MNIST  # lazy: start-up time

    return _load_idx(MNIST, "mnist", split, root, download, limit)


def load_fashionmnist(split: str, *, root: Path, download: bool = False,
                      limit: int | None = None, **_: object) -> ImageSet:
    """Fashion-MNIST clothing, uint8 [N, 1, 28, 28], labels 0..9."""
    from torchvision.datasets import FashionMNIST  # lazy: start-up time

    return _load_idx(FashionMNIST, "fashionmnist", split, root, download, limit)


def load_kmnist(split: str, *, root: Path, download: bool = False, limit: int | None = None,
                **_: object) -> ImageSet:
    """Kuzushiji-MNIST (cursive Japanese characters), uint8 [N, 1, 28, 28], labels 0..9."""
    from torchvision.datasets import KMNIST  # lazy: start-up time

    return _load_idx(KMNIST, "kmnist", split, root, download, limit)


def _load_idx(cls: type, name: str, split: str, root: Path, download: bool,
              limit: int | None) -> ImageSet:
    title = cls.__name__
    raw = Path(root) / title / "raw"
    try:
        ds = cls(root=str(root), train=(split == "train"), download=download)
    except OSError as exc:  # URLError is an OSError; also an unwritable root or unreadable file
        if not download:
            raise UserError(f"could not read {title} from {raw} ({_one_line(exc)}): check the "
                            f"files' permissions, or pass --data-root DIR") from None
        raise UserError(_download_failed(cls, raw, _one_line(exc))) from None
    except RuntimeError as exc:
        message = str(exc)
        if message.startswith("Dataset not found"):
            raise UserError(
                f"{title} not found in {raw}: pass --data-root DIR or set OOD_AUDIT_DATA to a "
                f"folder holding {title}/raw, or fetch it: ood-audit fetch {name} (or add --download)"
            ) from None
        if message.startswith("Error downloading"):
            raise UserError(_download_failed(cls, raw, _last_line(message))) from None
        # torchvision's reader fails with RuntimeError when the IDX header and size disagree
        raise _corrupt(title, raw, exc) from None
    except (AssertionError, TypeError, ValueError) as exc:  # torchvision's IDX header checks
        raise _corrupt(title, raw, exc) from None

    images = ds.data  # uint8 [N, 28, 28]
    labels = ds.targets.long()  # int64 [N]
    if limit is not None and limit < len(images):
        images, labels = images[:limit].clone(), labels[:limit].clone()  # drop the full storage
    return ImageSet(name=name, split=split, images=images.unsqueeze(1).contiguous(), labels=labels)


def by_hand(cls: type, raw: Path) -> str:
    """What to fetch by hand when torchvision cannot: the archive URLs (one shell brace
    list, so ``curl -O URL`` takes it as is) and the folder to gunzip them into."""
    stems = ",".join(filename.removesuffix(".gz") for filename, _md5 in cls.resources)
    return (f"fetch {cls.mirrors[0]}{{{stems}}}.gz by hand and gunzip them into {raw}, or point "
            f"OOD_AUDIT_DATA at a folder that holds {cls.__name__}/raw")


def _download_failed(cls: type, raw: Path, cause: str) -> str:
    return f"could not download {cls.__name__} into {raw} ({cause or 'no network?'}): {by_hand(cls, raw)}"


def _last_line(text: str) -> str:
    """torchvision's "Error downloading F:\nTried M, got:\nCAUSE" -> CAUSE (the last mirror's)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _corrupt(title: str, raw: Path, exc: BaseException) -> UserError:
    detail = _one_line(exc) or type(exc).__name__
    return UserError(
        f"{title} files in {raw} could not be read ({detail}): they look truncated or corrupt; "
        f"copy them again, or delete them and add --download"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
