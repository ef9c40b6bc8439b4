"""What the pipeline steps hand each other: directory layouts, results and errors.

What the steps share with the operator and the serving runtime (the step names, the run
directory's files, the artifact format) is in ``kubeloop.contract``; this module holds what only
the steps read.

Each step reads and writes plain directories (the paths of KFP artifacts), so the same code
runs under KFP on a cluster, under ``kfp.local`` on a laptop, and directly in unit tests.

Layouts
-------
raw dataset (ingest → preprocess)::

    train.parquet  validation.parquet  test.parquet   # the selected features + the target
    schema.json                                       # see ml/datasets.DatasetSchema

prepared dataset (preprocess → tune/train/evaluate/explain/optimise)::

    train.npz  validation.npz  test.npz   # arrays ``x`` (float32 (n, d); int64 token ids for
                                          # text) and ``y`` (int64 class index | float32 value)
    transform.json                        # the fitted transforms (see ml/transforms.py)
    schema.json                           # copied from the raw dataset
    quality.json                          # before/after data-quality report

model directory (train → evaluate/explain/optimise/register)::

    model.pt2  model.json      # the serving artifact (kubeloop.serving.artifact.save_model):
                               # raw feature rows in, transforms baked into the program
    arch.json                  # family + hyperparameters to rebuild the eager module
    state.pt                   # the eager module's state_dict (the network without transforms)
    history.json               # per-epoch train/validation loss and validation metric
    params.json                # the hyperparameters it was trained with
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubeloop.api.training_run import TrainingRunSpec

SCHEMA_FILE = "schema.json"
TRANSFORM_FILE = "transform.json"
QUALITY_FILE = "quality.json"
SPLITS = ("train", "validation", "test")
ARCH_FILE = "arch.json"
STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
PARAMS_FILE = "params.json"
# schema.json's and transform.json's "modality": what kind of rows the features describe.
Modality = Literal["tabular", "image", "text"]


class StepError(Exception):
    """A step cannot go on. ``field`` names the TrainingRun spec field at fault (camelCase path,
    e.g. ``data.target``) when the input is wrong; ``permanent`` errors are not retried."""

    def __init__(self, message: str, *, field: str = "", permanent: bool = True) -> None:
        super().__init__(message)
        self.field = field
        self.permanent = permanent

    @property
    def message(self) -> str:
        return str(self.args[0])


@dataclass
class StepResult:
    """What a step returns besides its files: logged into KFP's Metrics/ClassificationMetrics
    artifacts by the component wrapper and into the step's progress record."""

    metrics: dict[str, float] = field(default_factory=dict)
    # classification only: (labels, matrix[true][predicted])
    confusion: tuple[list[str], list[list[int]]] | None = None
    # binary classification only: (fpr, tpr, thresholds)
    roc: tuple[list[float], list[float], list[float]] | None = None
    # small JSON-able values the pipeline branches on or the operator shows (e.g. gates_passed)
    outputs: dict[str, Any] = field(default_factory=dict)
    # files published into the run directory: name → path relative to run_uri
    published: dict[str, str] = field(default_factory=dict)


def parse_spec(spec_json: str) -> TrainingRunSpec:
    """The TrainingRun spec the operator passed (camelCase JSON, defaults filled)."""
    return TrainingRunSpec.model_validate_json(spec_json)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, value: Any) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(value, indent=2, sort_keys=True, default=float) + "\n")
    return out
