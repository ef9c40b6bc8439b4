"""The serving artifact's layout and digest (the format itself: serving/artifact.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

FORMAT: Final = "torch-export"  # model.json's "format"
REGISTRY_FORMAT: Final = "torch"  # ModelVersion.spec.artifact.format of such a directory
PROGRAM_FILE: Final = "model.pt2"
METADATA_FILE: Final = "model.json"
TASKS: Final = ("classification", "regression")


def digest(path: Path) -> str:
    """sha256 of a file; for a directory, of every file's relative path and digest."""
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    h = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{child.relative_to(path).as_posix()}\0{digest(child)}\n".encode())
    return h.hexdigest()
