"""The model artifact the model server loads: one directory, two files.

- ``model.pt2``: a ``torch.export`` ExportedProgram whose batch dimension is dynamic.
- ``model.json``: what the program alone does not say — the task, feature names, class labels,
  the standard scaling applied before the model (so serving applies the training transforms) and
  the reference distributions (quantile buckets) that drift detection compares traffic with.

The training pipeline writes artifacts with :func:`save_model`; the model server reads them with
:func:`load_model`. Both live here, beside the torch they need; what other sides agree on
without torch is in :mod:`kubeloop.contract`: the file names, ``format`` and tasks
(:mod:`kubeloop.contract.artifact`) and the reference distributions in ``model.json`` with
their bucket rule (:mod:`kubeloop.contract.reference`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from kubeloop.contract.artifact import FORMAT, METADATA_FILE, PROGRAM_FILE, TASKS

Task = Literal["classification", "regression"]
FloatArray = npt.NDArray[np.float32]


class ArtifactError(Exception):
    """The artifact directory cannot be saved or loaded; the message says which file and why."""


def save_model(
    directory: str | Path,
    module: torch.nn.Module,
    *,
    task: Task,
    features: Sequence[str],
    classes: Sequence[str] = (),
    mean: Sequence[float],
    scale: Sequence[float],
    reference: Mapping[str, Any],
) -> Path:
    """Export ``module`` (which takes standard-scaled rows of ``len(features)`` floats) with a
    dynamic batch dimension and write ``model.pt2`` and ``model.json`` into ``directory``."""
    if task not in TASKS:
        raise ArtifactError(f"task={task!r} is not supported; expected one of {list(TASKS)}")
    if task == "classification" and len(classes) < 2:
        raise ArtifactError(f"classes={list(classes)!r}: classification needs at least 2 labels")
    width = len(features)
    for name, values in (("mean", mean), ("scale", scale)):
        if len(values) != width:
            raise ArtifactError(
                f"{name} has {len(values)} values; expected {width} (one a feature)"
            )
    if any(not math.isfinite(s) or s == 0 for s in scale):
        raise ArtifactError("scale must be finite and non-zero for every feature")

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    # An example batch of 2: torch.export specialises sizes 0 and 1, so 2 keeps the batch symbolic.
    example = torch.zeros(2, width, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out / PROGRAM_FILE))
    metadata = {
        "format": FORMAT,
        "task": task,
        "features": list(features),
        "classes": [str(c) for c in classes] if task == "classification" else [],
        "preprocess": {"mean": [float(m) for m in mean], "scale": [float(s) for s in scale]},
        "reference": dict(reference),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out


@dataclass
class LoadedModel:
    """A loaded artifact: ``predict`` takes raw rows and applies the training scaling itself."""

    module: torch.nn.Module
    task: Task
    features: list[str]
    classes: list[str]
    mean: FloatArray
    scale: FloatArray
    reference: dict[str, Any]

    @property
    def n_features(self) -> int:
        return len(self.features)

    def check_rows(self, x: npt.ArrayLike) -> FloatArray:
        """``x`` as float32 of shape (n, n_features), or ValueError saying what was expected."""
        rows = np.asarray(x, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_features or rows.shape[0] == 0:
            raise ValueError(
                f"input has shape {list(rows.shape)}; expected [n, {self.n_features}] with n >= 1 "
                f"(one row of {self.n_features} features: {', '.join(self.features[:3])}, ...)"
            )
        return rows

    def predict(self, x: npt.ArrayLike) -> FloatArray:
        """Class probabilities, shape (n, n_classes), or regression values, shape (n,)."""
        rows = self.check_rows(x)
        scaled = (rows - self.mean) / self.scale
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32)))
            if self.task == "classification":
                out = torch.softmax(out, dim=1)
            else:
                out = out.reshape(out.shape[0])
        return np.asarray(out.numpy(), dtype=np.float32)


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: not a kubeloop model directory") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format={meta.get('format')!r}; expected {FORMAT!r}")
    if meta.get("task") not in TASKS:
        raise ArtifactError(f"{path}: task={meta.get('task')!r}; expected one of {list(TASKS)}")
    features = meta.get("features")
    if not isinstance(features, list) or not features:
        raise ArtifactError(f"{path}: features={features!r}; expected a non-empty list of names")
    pre = meta.get("preprocess") or {}
    for key in ("mean", "scale"):
        values = pre.get(key)
        if not isinstance(values, list) or len(values) != len(features):
            raise ArtifactError(
                f"{path}: preprocess.{key} must list {len(features)} numbers (one a feature)"
            )
    if meta["task"] == "classification" and len(meta.get("classes") or []) < 2:
        raise ArtifactError(f"{path}: classes={meta.get('classes')!r}; expected at least 2 labels")
    return meta


def load_model(directory: str | Path) -> LoadedModel:
    """Load an artifact written by :func:`save_model`; ArtifactError names what is wrong."""
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"model directory {root} does not exist")
    meta = _read_metadata(root / METADATA_FILE)
    program_path = root / PROGRAM_FILE
    if not program_path.is_file():
        raise ArtifactError(f"{program_path} is missing: the exported program was not saved")
    try:
        program = torch.export.load(str(program_path))
    except Exception as exc:  # torch raises many types for a corrupt archive
        raise ArtifactError(f"{program_path} is not a torch.export program: {exc}") from exc
    return LoadedModel(
        module=program.module(),
        task=meta["task"],
        features=[str(f) for f in meta["features"]],
        classes=[str(c) for c in meta.get("classes") or []],
        mean=np.asarray(meta["preprocess"]["mean"], dtype=np.float32),
        scale=np.asarray(meta["preprocess"]["scale"], dtype=np.float32),
        reference=dict(meta.get("reference") or {}),
    )
