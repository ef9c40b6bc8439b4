"""What a loaded model artifact is, whatever its format (``model.json``'s ``format``):
:class:`LoadedModel` (torch.export, :mod:`kubeloop.serving.artifact`) and its ONNX subclass
(:mod:`kubeloop.serving.onnx_model`) share the rows check, the scaling, the devices, the
fields ``model.json`` gives and the row program both formats export the transforms as.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import torch

from kubeloop.contract.artifact import TASKS
from kubeloop.contract.reference import MODALITIES, TABULAR

Task = Literal["classification", "regression"]
FloatArray = npt.NDArray[np.float32]
DEVICES: Final = ("cpu", "cuda", "auto")


class ArtifactError(Exception):
    """The artifact directory cannot be saved or loaded; the message says which file and why."""


def export_rows_program(module: torch.nn.Module, width: int) -> torch.export.ExportedProgram:
    """``module`` (rows of ``width`` floats in) exported with a dynamic batch dimension."""
    # An example batch of 2: torch.export specialises sizes 0 and 1, so 2 keeps the batch symbolic.
    example = torch.zeros(2, width, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))


def outputs(raw: torch.Tensor, task: str) -> torch.Tensor:
    raw = raw.float()
    return torch.softmax(raw, dim=1) if task == "classification" else raw.reshape(raw.shape[0])


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
            out = outputs(self.module(torch.from_numpy(scaled)), self.task)
        return np.asarray(out.numpy(), dtype=np.float32)

    def _predict_on_device(self, scaled: FloatArray) -> FloatArray:
        n = len(scaled)
        with self._lock, torch.inference_mode():
            self._pinned_in = _room(self._pinned_in, scaled.size)
            host_in = self._pinned_in[: scaled.size].view(scaled.shape)
            host_in.copy_(torch.from_numpy(scaled))
            batch = host_in.to(self.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                out = outputs(self.module(batch), self.task)
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


def check_artifact_kind(task: str, modality: str, classes: Sequence[str]) -> None:
    """What every format's writer refuses before it writes anything."""
    if task not in TASKS:
        raise ArtifactError(f"task={task!r} is not supported; expected one of {list(TASKS)}")
    if modality not in MODALITIES:
        raise ArtifactError(f"modality={modality!r}; expected one of {list(MODALITIES)}")
    if task == "classification" and len(classes) < 2:
        raise ArtifactError(f"classes={list(classes)!r}: classification needs at least 2 labels")
