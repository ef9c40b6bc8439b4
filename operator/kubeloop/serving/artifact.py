"""The model artifact the model server loads: one directory, two files.

- ``model.pt2``: a ``torch.export`` ExportedProgram whose batch dimension is dynamic.
- ``model.json``: what the program alone does not say — the task, the input ``modality``
  (tabular, text or image), feature names, class labels, the standard scaling applied before
  the model (so serving applies the training transforms), the reference distributions that
  drift detection compares traffic with, and ``precision``: whether the model may run in bf16.

Devices: :func:`load_model` puts the program on the CPU or on CUDA (``device="auto"`` takes
CUDA when there is one). On CUDA each batch goes through pinned host buffers, and the model
runs under bf16 autocast when the artifact allows it. *Allows* means an accuracy check, done
once when the artifact is written (:func:`save_model` with ``check_rows``, the validation
rows) and recorded in ``model.json``: under bf16 autocast the predictions must agree with the
fp32 ones — the same top class on at least 99 % of the rows and a mean absolute probability
difference of at most 0.01 for classifiers; a mean absolute error of at most 1 % of the
predictions' standard deviation for regression. Autocast keeps the baked-in transforms
(imputation, clipping, category codes) in fp32 and runs only matmuls and convolutions in bf16.
An artifact without the check runs in fp32.

Gradient-boosted trees use a second format, ``onnx`` (``model.json``'s ``format``): the trees
in ``model.onnx`` behind the same transforms, see :mod:`kubeloop.serving.onnx_model`;
:func:`load_model` reads ``format`` and refuses a missing or unknown one.

The training pipeline writes artifacts with :func:`save_model`; the model server reads them with
:func:`load_model`. Both live here, beside the torch they need; what other sides agree on
without torch is in :mod:`kubeloop.contract`: the file names, ``format`` and tasks
(:mod:`kubeloop.contract.artifact`) and the reference distributions in ``model.json`` with
their bucket rule (:mod:`kubeloop.contract.reference`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch

from kubeloop.contract.artifact import (
    FORMAT,
    FORMATS,
    METADATA_FILE,
    ONNX_FORMAT,
    PROGRAM_FILE,
    TASKS,
)
from kubeloop.contract.reference import MODALITIES, TABULAR
from kubeloop.serving.loaded_model import (
    DEVICES,
    ArtifactError,
    FloatArray,
    LoadedModel,
    Task,
    check_artifact_kind,
    export_rows_program,
    metadata_fields,
    outputs,
    resolve_device,
)
from kubeloop.serving.onnx_model import load_onnx_model

__all__ = [  # what the model server, the pipeline and the tests import from here
    "DEVICES",
    "ArtifactError",
    "FloatArray",
    "LoadedModel",
    "Task",
    "bf16_check",
    "export_rows_program",
    "load_model",
    "resolve_device",
    "save_model",
]


# The bf16 accuracy check (see the module docstring).
BF16_CHECK_ROWS: Final = 2048
BF16_MIN_AGREEMENT: Final = 0.99
BF16_MAX_MEAN_PROBABILITY_DIFF: Final = 0.01
BF16_MAX_RELATIVE_ERROR: Final = 0.01


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
    modality: str = TABULAR,
    check_rows: npt.ArrayLike | None = None,
) -> Path:
    """Export ``module`` (which takes standard-scaled rows of ``len(features)`` floats) with a
    dynamic batch dimension and write ``model.pt2`` and ``model.json`` into ``directory``.

    ``check_rows`` (raw rows, e.g. the validation split): run the bf16 accuracy check on them
    and record the verdict, so serving on a GPU may use bf16; without them it never does."""
    check_artifact_kind(task, modality, classes)
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
    program = export_rows_program(module, width)
    torch.export.save(program, str(out / PROGRAM_FILE))
    precision: dict[str, Any] = {}
    if check_rows is not None:
        rows = np.asarray(check_rows, dtype=np.float32)[:BF16_CHECK_ROWS]
        scaled = np.asarray(
            (rows - np.asarray(mean, np.float32)) / np.asarray(scale, np.float32), np.float32
        )
        precision["bf16"] = bf16_check(program.module(), scaled, task)
    metadata = {
        "format": FORMAT,
        "task": task,
        "modality": modality,
        "features": list(features),
        "classes": [str(c) for c in classes] if task == "classification" else [],
        "preprocess": {"mean": [float(m) for m in mean], "scale": [float(s) for s in scale]},
        "reference": dict(reference),
        "precision": precision,
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def bf16_check(module: torch.nn.Module, scaled: FloatArray, task: str) -> dict[str, Any]:
    """Whether ``module`` predicts like itself under bf16 autocast on ``scaled`` rows (measured
    on the CPU, whose autocast rounds matmul and convolution inputs to bf16 as CUDA's does)."""
    if not len(scaled):
        return {"allowed": False, "rows": 0, "reason": "no rows to check"}
    x = torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))
    try:
        with torch.inference_mode():
            full = outputs(module(x), task).numpy().astype(np.float64)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = outputs(module(x), task).numpy().astype(np.float64)
    except Exception as exc:  # a model that cannot run in bf16 at all stays in fp32
        reason = f"{type(exc).__name__}: {exc}"[:300]
        return {"allowed": False, "rows": len(x), "reason": reason}
    result: dict[str, Any] = {"rows": len(x)}
    if task == "classification":
        agreement = float((full.argmax(axis=1) == half.argmax(axis=1)).mean())
        diff = float(np.abs(full - half).mean())
        result.update(agreement=agreement, mean_abs_probability_diff=diff)
        ok = agreement >= BF16_MIN_AGREEMENT and diff <= BF16_MAX_MEAN_PROBABILITY_DIFF
    else:
        spread = float(full.std()) or 1.0
        error = float(np.abs(full - half).mean() / spread)
        result.update(relative_error=error)
        ok = error <= BF16_MAX_RELATIVE_ERROR
    return {"allowed": bool(ok and np.isfinite(half).all()), **result}


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: not a kubeloop model directory") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") not in FORMATS:
        raise ArtifactError(
            f"{path}: format={meta.get('format')!r}; expected one of {list(FORMATS)} "
            f"({FORMAT!r}: model.pt2, {ONNX_FORMAT!r}: model.onnx)"
        )
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
    if meta.setdefault("modality", TABULAR) not in MODALITIES:
        raise ArtifactError(
            f"{path}: modality={meta['modality']!r}; expected one of {list(MODALITIES)}"
        )
    return meta


def load_model(directory: str | Path, *, device: str = "cpu") -> LoadedModel:
    """Load an artifact written by :func:`save_model` onto ``device`` ("cpu", "cuda" or
    "auto"); ArtifactError names what is wrong."""
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"model directory {root} does not exist")
    meta = _read_metadata(root / METADATA_FILE)
    target = resolve_device(device)
    if meta["format"] == ONNX_FORMAT:
        return load_onnx_model(root, meta)
    program_path = root / PROGRAM_FILE
    if not program_path.is_file():
        raise ArtifactError(f"{program_path} is missing: the exported program was not saved")
    try:
        program = torch.export.load(str(program_path))
    except Exception as exc:  # torch raises many types for a corrupt archive
        raise ArtifactError(f"{program_path} is not a torch.export program: {exc}") from exc
    if target != "cpu":
        from torch.export.passes import move_to_device_pass

        # Rewrites the device of every parameter, buffer and constant *and* of the ops that
        # create tensors (a .to() on the module would leave those on the CPU).
        program = move_to_device_pass(program, target)
    fields = metadata_fields(meta)
    model = LoadedModel(
        module=program.module(),
        device=target,
        bf16=target == "cuda"
        and (fields["precision"].get("bf16") or {}).get("allowed") is True
        and torch.cuda.is_bf16_supported(),
        **fields,
    )
    if target != "cpu":
        _warm_up(model)
    return model


def _warm_up(model: LoadedModel) -> None:
    """One small batch, so the first request does not pay for CUDA's lazy initialisation (a
    model that fails on it is still loaded: its requests will answer the error)."""
    with contextlib.suppress(Exception):
        model.predict(np.zeros((2, model.n_features), dtype=np.float32))
