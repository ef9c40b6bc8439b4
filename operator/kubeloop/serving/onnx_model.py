"""The ``onnx`` artifact: gradient-boosted trees in ONNX behind the fitted transforms.

- ``model.onnx``: the tree ensemble (transformed features in; class probabilities
  ``(n, classes)`` or values ``(n, 1)`` out), run by onnxruntime on its CPU provider.
- ``transform.pt2``: the fitted transforms as a ``torch.export`` program (raw serving rows in),
  the very module a torch artifact bakes in front of its network, so both formats read the
  same rows the same way.
- ``model.json``: as for the torch artifact, with ``format: onnx`` and ``onnx`` (the graph's
  input and output names, and the parity check against the trees that produced it).

Why ONNX for trees: the serving image then needs neither lightgbm nor its OpenMP runtime, and
onnxruntime's TreeEnsemble kernel answers a row in microseconds. :class:`OnnxModel` is a
:class:`~kubeloop.serving.artifact.LoadedModel`, so the protocols, batching, the cache and the
metrics use it unchanged. Trees run in fp32 on the CPU whatever ``device`` asks for: there is
no bf16 to gain and the image ships onnxruntime's CPU build.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kubeloop.contract.artifact import (
    METADATA_FILE,
    ONNX_FILE,
    ONNX_FORMAT,
    TRANSFORM_PROGRAM_FILE,
)
from kubeloop.contract.reference import TABULAR
from kubeloop.serving.loaded_model import (
    ArtifactError,
    FloatArray,
    LoadedModel,
    Task,
    check_artifact_kind,
    export_rows_program,
    metadata_fields,
)

FP32_ONLY = "gradient-boosted trees run in fp32 on onnxruntime's CPU provider"


@dataclass
class OnnxModel(LoadedModel):
    """A loaded ``onnx`` artifact; ``module`` is the transform program."""

    session: Any = field(default=None, repr=False)
    input_name: str = ""
    output_name: str = ""

    def predict(self, x: npt.ArrayLike) -> FloatArray:
        """Class probabilities, shape (n, n_classes), or regression values, shape (n,)."""
        rows = self.check_rows(x)
        scaled = np.ascontiguousarray((rows - self.mean) / self.scale, dtype=np.float32)
        with torch.inference_mode():
            features = self.module(torch.from_numpy(scaled)).numpy()
        (out,) = self.session.run(
            [self.output_name], {self.input_name: np.ascontiguousarray(features, np.float32)}
        )
        values = np.asarray(out, dtype=np.float32)
        return values if self.task == "classification" else values.reshape(len(rows))


def save_onnx_model(
    directory: str | Path,
    onnx_bytes: bytes,
    transform: torch.nn.Module,
    *,
    task: Task,
    features: Sequence[str],
    classes: Sequence[str] = (),
    reference: Mapping[str, Any],
    input_name: str,
    output_name: str,
    parity: Mapping[str, Any],
    modality: str = TABULAR,
) -> Path:
    """Write ``model.onnx``, ``transform.pt2`` (``transform`` exported for rows of
    ``len(features)`` floats) and ``model.json`` into ``directory``."""
    check_artifact_kind(task, modality, classes)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    width = len(features)
    (out / ONNX_FILE).write_bytes(onnx_bytes)
    torch.export.save(export_rows_program(transform, width), str(out / TRANSFORM_PROGRAM_FILE))
    metadata = {
        "format": ONNX_FORMAT,
        "task": task,
        "modality": modality,
        "features": list(features),
        "classes": [str(c) for c in classes] if task == "classification" else [],
        # the transforms are in transform.pt2; the identity scaling keeps model.json's shape
        "preprocess": {"mean": [0.0] * width, "scale": [1.0] * width},
        "reference": dict(reference),
        "precision": {"bf16": {"allowed": False, "rows": 0, "reason": FP32_ONLY}},
        "onnx": {"input": input_name, "output": output_name, "parity": dict(parity)},
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def onnx_session(model: bytes | str | Path) -> Any:
    """An onnxruntime session on the CPU provider, one intra-op thread: a tree ensemble on a
    serving batch is microseconds of work, less than a thread pool costs to wake, and replicas
    scale out instead."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def load_onnx_model(root: Path, meta: Mapping[str, Any]) -> OnnxModel:
    """The ``onnx`` artifact in ``root`` whose checked ``model.json`` is ``meta``."""
    for name, what in ((ONNX_FILE, "the trees"), (TRANSFORM_PROGRAM_FILE, "the transforms")):
        if not (root / name).is_file():
            raise ArtifactError(
                f"{root / METADATA_FILE} says format='onnx' but {root / name} ({what}) is missing"
            )
    names = meta.get("onnx") or {}
    try:
        session = onnx_session(root / ONNX_FILE)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ArtifactError(f"{root / ONNX_FILE} is not a loadable ONNX model: {exc}") from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    input_name = str(names.get("input") or inputs[0])
    output_name = str(names.get("output") or outputs[-1])
    if input_name not in inputs or output_name not in outputs:
        raise ArtifactError(
            f"{root / METADATA_FILE}: onnx.input={input_name!r}, onnx.output={output_name!r}; "
            f"the graph has inputs {inputs} and outputs {outputs}"
        )
    try:
        transform = torch.export.load(str(root / TRANSFORM_PROGRAM_FILE))
    except Exception as exc:  # torch raises many types for a corrupt archive
        raise ArtifactError(
            f"{root / TRANSFORM_PROGRAM_FILE} is not a torch.export program: {exc}"
        ) from exc
    return OnnxModel(
        module=transform.module(),
        device="cpu",
        bf16=False,
        **metadata_fields(meta),
        session=session,
        input_name=input_name,
        output_name=output_name,
    )
