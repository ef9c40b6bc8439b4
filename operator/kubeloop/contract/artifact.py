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
# Gradient-boosted trees: the trees in ONNX (run by onnxruntime), the fitted transforms in
# front of them as a torch.export program (the same module the torch artifacts bake in).
ONNX_FORMAT: Final = "onnx"
ONNX_FILE: Final = "model.onnx"
TRANSFORM_PROGRAM_FILE: Final = "transform.pt2"
FORMATS: Final = (FORMAT, ONNX_FORMAT)
# model.json's "format" → ModelVersion.spec.artifact.format and .framework
REGISTRY_FORMATS: Final = {FORMAT: REGISTRY_FORMAT, ONNX_FORMAT: "onnx"}
MODEL_FILES: Final = (PROGRAM_FILE, ONNX_FILE, TRANSFORM_PROGRAM_FILE)


def model_size_bytes(directory: Path) -> int:
    """Bytes of the files a server loads (the metadata aside), whichever the format."""
    return sum((directory / n).stat().st_size for n in MODEL_FILES if (directory / n).is_file())


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
