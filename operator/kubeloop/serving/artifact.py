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
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

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

Task = Literal["classification", "regression"]
FloatArray = npt.NDArray[np.float32]
DEVICES: Final = ("cpu", "cuda", "auto")

# The bf16 accuracy check (see the module docstring).
BF16_CHECK_ROWS: Final = 2048
BF16_MIN_AGREEMENT: Final = 0.99
BF16_MAX_MEAN_PROBABILITY_DIFF: Final = 0.01
BF16_MAX_RELATIVE_ERROR: Final = 0.01


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
    modality: str = TABULAR,
    check_rows: npt.ArrayLike | None = None,
) -> Path:
    """Export ``module`` (which takes standard-scaled rows of ``len(features)`` floats) with a
    dynamic batch dimension and write ``model.pt2`` and ``model.json`` into ``directory``.

    ``check_rows`` (raw rows, e.g. the validation split): run the bf16 accuracy check on them
    and record the verdict, so serving on a GPU may use bf16; without them it never does."""
    if task not in TASKS:
        raise ArtifactError(f"task={task!r} is not supported; expected one of {list(TASKS)}")
    if modality not in MODALITIES:
        raise ArtifactError(f"modality={modality!r}; expected one of {list(MODALITIES)}")
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


def export_rows_program(module: torch.nn.Module, width: int) -> torch.export.ExportedProgram:
    """``module`` (rows of ``width`` floats in) exported with a dynamic batch dimension."""
    # An example batch of 2: torch.export specialises sizes 0 and 1, so 2 keeps the batch symbolic.
    example = torch.zeros(2, width, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))


def _outputs(raw: torch.Tensor, task: str) -> torch.Tensor:
    raw = raw.float()
    return torch.softmax(raw, dim=1) if task == "classification" else raw.reshape(raw.shape[0])


def bf16_check(module: torch.nn.Module, scaled: FloatArray, task: str) -> dict[str, Any]:
    """Whether ``module`` predicts like itself under bf16 autocast on ``scaled`` rows (measured
    on the CPU, whose autocast rounds matmul and convolution inputs to bf16 as CUDA's does)."""
    if not len(scaled):
        return {"allowed": False, "rows": 0, "reason": "no rows to check"}
    x = torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))
    try:
        with torch.inference_mode():
            full = _outputs(module(x), task).numpy().astype(np.float64)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = _outputs(module(x), task).numpy().astype(np.float64)
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


def resolve_device(device: str) -> str:
    """``device`` as a torch device type: ``auto`` is CUDA when there is one, else the CPU."""
    if device not in DEVICES:
        raise ArtifactError(f"device={device!r}; expected one of {list(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(
            "device='cuda' but this machine has no usable CUDA device "
            "(torch.cuda.is_available() is False); use device 'cpu' or 'auto'"
        )
    return device


@dataclass
class LoadedModel:
    """A loaded artifact: ``predict`` takes raw rows and applies the training scaling itself,
    on ``device`` (bf16 autocast when ``bf16``)."""

    module: torch.nn.Module
    task: Task
    features: list[str]
    classes: list[str]
    mean: FloatArray
    scale: FloatArray
    reference: dict[str, Any]
    modality: str = TABULAR
    device: str = "cpu"
    bf16: bool = False
    precision: dict[str, Any] = field(default_factory=dict)
    # CUDA only: page-locked host buffers for the copies in and out, grown as needed.
    _pinned_in: torch.Tensor | None = field(default=None, init=False, repr=False)
    _pinned_out: torch.Tensor | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

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
        scaled = np.ascontiguousarray((rows - self.mean) / self.scale, dtype=np.float32)
        if self.device != "cpu":
            return self._predict_on_device(scaled)
        with torch.inference_mode():
            out = _outputs(self.module(torch.from_numpy(scaled)), self.task)
        return np.asarray(out.numpy(), dtype=np.float32)

    def _predict_on_device(self, scaled: FloatArray) -> FloatArray:
        n = len(scaled)
        with self._lock, torch.inference_mode():
            self._pinned_in = _room(self._pinned_in, scaled.size)
            host_in = self._pinned_in[: scaled.size].view(scaled.shape)
            host_in.copy_(torch.from_numpy(scaled))
            batch = host_in.to(self.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                out = _outputs(self.module(batch), self.task)
            self._pinned_out = _room(self._pinned_out, out.numel())
            host_out = self._pinned_out[: out.numel()].view(out.shape)
            host_out.copy_(out, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            # A copy: the pinned buffer is reused by the next batch.
            return np.array(host_out.numpy()[:n], dtype=np.float32)


def _room(buffer: torch.Tensor | None, size: int) -> torch.Tensor:
    """A pinned float32 buffer of at least ``size`` elements (``buffer`` when it is enough)."""
    if buffer is not None and buffer.numel() >= size:
        return buffer
    capacity = 1 << max(size - 1, 1).bit_length()
    return torch.empty(capacity, dtype=torch.float32, pin_memory=True)


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


def metadata_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`LoadedModel` fields a checked ``model.json`` gives, whatever the format."""
    return {
        "task": meta["task"],
        "features": [str(f) for f in meta["features"]],
        "classes": [str(c) for c in meta.get("classes") or []],
        "mean": np.asarray(meta["preprocess"]["mean"], dtype=np.float32),
        "scale": np.asarray(meta["preprocess"]["scale"], dtype=np.float32),
        "reference": dict(meta.get("reference") or {}),
        "modality": str(meta["modality"]),
        "precision": dict(meta.get("precision") or {}),
    }


def load_model(directory: str | Path, *, device: str = "cpu") -> LoadedModel:
    """Load an artifact written by :func:`save_model` onto ``device`` ("cpu", "cuda" or
    "auto"); ArtifactError names what is wrong."""
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"model directory {root} does not exist")
    meta = _read_metadata(root / METADATA_FILE)
    target = resolve_device(device)
    if meta["format"] == ONNX_FORMAT:
        from kubeloop.serving.onnx_model import load_onnx_model

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
