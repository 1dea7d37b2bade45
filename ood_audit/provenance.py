"""Where an imported model came from: the record ``ood-audit import`` writes, and its check.

A run made by ``ood-audit import`` holds a model trained elsewhere. Its record names the
kind of import, every source file with its sha256, the declared training set, the input
range and the image shape. It is written twice, as ``RUN/import.json`` (for people) and
in the checkpoint's header metadata under :data:`HEADER_KEY` (for
:func:`~ood_audit.checkpoint.load_checkpoint`, which calls :func:`verify` before it
builds the model). A source changed or removed since the import stops every command that
loads the model with one line: the scores would no longer describe the file the user
names, and for ``import python`` the file is code that would run.

Torch-free: only the standard library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

#: The record's file in the run directory.
IMPORT_FILE = "import.json"
#: The checkpoint header key that holds the same record as JSON.
HEADER_KEY = "import"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Source:
    """One file an import read: what it was (``checkpoint``, ``hparams``, ``module``,
    ``weights``), its absolute path, and its sha256 when read."""

    role: str
    path: str
    sha256: str

    @classmethod
    def of(cls, role: str, path: Path) -> Source:
        path = Path(path).expanduser().resolve()
        return cls(role, str(path), file_sha256(path))


@dataclass
class ImportRecord:
    """What ``ood-audit import`` made a run from (``RUN/import.json``)."""

    kind: str  # y0ast | rosinality | python
    sources: list[Source]
    data: str  # the declared training set, as given (--data)
    input_shape: list[int]  # (C, H, W) of the data set's images
    input_range: str  # what the model takes, e.g. "-0.5,0.5" (the Glow ports: x - 0.5)
    discrete: bool = False  # log_prob takes uint8 pixels and gives log P(k)
    model: str = ""  # the family the checkpoint holds: glow, glow-cv or imported
    options: dict[str, Any] = field(default_factory=dict)  # the import's own flags
    version: str = ""  # ood-audit's version at the import

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ImportRecord:
        try:
            raw = json.loads(text)
            raw["sources"] = [Source(**s) for s in raw["sources"]]
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{where}: damaged import record ({exc}); import the model "
                            "again into a new run") from None

    def command(self) -> str:
        """The import command, roughly, for messages: ``ood-audit import y0ast FILE ...``."""
        first = self.sources[0].path if self.sources else "SOURCE"
        if self.kind == "python":
            first += f":{self.options.get('factory', 'FACTORY')}"
        return f"ood-audit import {self.kind} {first} ... --out NEW_RUN"


def verify(record: ImportRecord, where: str) -> None:
    """UserError (one line) when a source is gone or its bytes changed since the import."""
    for src in record.sources:
        path = Path(src.path)
        if not path.is_file():
            raise UserError(f"{where} was imported from {src.path} ({src.role}), which is gone: "
                            f"put it back, or import again into a new run ({record.command()})")
        now = file_sha256(path)
        if now != src.sha256:
            raise UserError(f"{where} was imported from {src.path} ({src.role}), which has changed "
                            f"since (sha256 {src.sha256[:12]}... then, {now[:12]}... now): restore "
                            f"it, or import again into a new run ({record.command()})")
