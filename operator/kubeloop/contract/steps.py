"""The pipeline's steps and the run directory the steps write and the operator reads.

A run directory (``<artifact root>/<namespace>/<run key>/attempt-<n>``) holds::

    steps/<step>.json     # a progress record per step (pipelines/kubeloop_pipelines/progress.py)
    evaluation.json       # the evaluate step's metrics and gate verdicts
    modelversion.json     # the register step's ModelVersion manifest
    model/                # the published serving artifact
"""

from __future__ import annotations

from typing import Final

# Steps in pipeline order; the operator shows the running one in `kubectl get tr`.
STEPS: Final = (
    "ingest",
    "preprocess",
    "tune",
    "train",
    "optimize",
    "evaluate",
    "explain",
    "register",
)
STEPS_DIR: Final = "steps"
EVALUATION_FILE: Final = "evaluation.json"
MANIFEST_FILE: Final = "modelversion.json"
MODEL_DIR: Final = "model"

# A task's display name in KFP; its step is found again from it (``step_of_task``).
DISPLAY_NAMES: Final = {
    "ingest": "Ingest data",
    "preprocess": "Preprocess data",
    "tune": "Tune hyperparameters",
    "train": "Train model",
    "optimize": "Optimize model",
    "evaluate": "Evaluate model",
    "explain": "Explain model",
    "register": "Register model version",
}
_STEP_OF_DISPLAY: Final = {display: step for step, display in DISPLAY_NAMES.items()}


def step_record(step: str) -> str:
    """The progress record's path inside the run directory."""
    return f"{STEPS_DIR}/{step}.json"


def step_of_task(display_name: str) -> str:
    """The step a KFP task ran, from its display name ('' for a task that is no step, such as
    the pipeline's own DAG or a condition branch)."""
    name = display_name.strip()
    if name in _STEP_OF_DISPLAY:
        return _STEP_OF_DISPLAY[name]
    # KFP may suffix a retried or looped task's name ("Train model-2"): the longest prefix wins.
    found = [d for d in _STEP_OF_DISPLAY if name.startswith(d)]
    return _STEP_OF_DISPLAY[max(found, key=len)] if found else ""
