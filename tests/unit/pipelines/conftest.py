"""Shared pieces of the pipeline tests: one torch thread for every module, spec builders, the
breast-cancer arrays, and the real ingest → preprocess (→ train) steps run into a directory.

Fixtures here are found by pytest; import the plain helpers
(``from tests.unit.pipelines.conftest import make_spec``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kubeloop.api.training_run import DataSource, TrainingRunSpec
from kubeloop_pipelines.contract import StepResult
from kubeloop_pipelines.progress import StepReport

Arrays = tuple[np.ndarray[Any, Any], ...]
SMALL_MLP: dict[str, Any] = {"epochs": 8, "hiddenLayers": [32, 16]}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Small models on a shared 2-core machine: one intra-op thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- specs -------------------------------------------------------------------------------


def data_source(**fields: Any) -> DataSource:
    """A ``data`` section reading ``file:///data/table.csv`` with target ``y``, unless changed."""
    return DataSource.model_validate({"uri": "file:///data/table.csv", "target": "y"} | fields)


def make_spec(uri: str, target: str, **sections: Any) -> TrainingRunSpec:
    """A TrainingRun spec reading ``uri``; ``sections`` are further top-level spec fields."""
    return TrainingRunSpec.model_validate(
        {"data": {"uri": uri, "target": target}, "registration": {"modelName": "m"}} | sections
    )


def spec_for(uri: str, target: str, **sections: Any) -> TrainingRunSpec:
    """:func:`make_spec` with a small MLP that trains in seconds, unless ``model`` is given."""
    return make_spec(uri, target, **({"model": SMALL_MLP} | sections))


# --- data and the real steps -------------------------------------------------------------


@pytest.fixture(scope="module")
def cancer() -> Arrays:
    """Breast cancer, 70/30 (seeded, stratified), standard-scaled: (x_train, y_train, x_val,
    y_val)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    mean, std = xtr.mean(axis=0), xtr.std(axis=0)
    return (
        ((xtr - mean) / std).astype(np.float32),
        ytr.astype(np.int64),
        ((xva - mean) / std).astype(np.float32),
        yva.astype(np.int64),
    )


def ingest_and_preprocess(
    root: Path, spec: TrainingRunSpec, run_uri: str = ""
) -> tuple[StepResult, StepResult]:
    """The real ingest → preprocess steps into ``root`` (``raw/``, ``prepared/``,
    ``quality.html``): their results."""
    from kubeloop_pipelines.steps import ingest, preprocess

    ingested = ingest.run(
        spec, report=StepReport(run_uri, "ingest"), run_uri=run_uri, dataset_dir=root / "raw"
    )
    prepared = preprocess.run(
        spec, report=StepReport(run_uri, "preprocess"), run_uri=run_uri, raw_dir=root / "raw",
        prepared_dir=root / "prepared", report_html=root / "quality.html",
    )  # fmt: skip
    return ingested, prepared


def trained(root: Path, spec: TrainingRunSpec) -> tuple[Path, Path]:
    """The real ingest → preprocess → train steps into ``root``: (prepared_dir, model_dir)."""
    from kubeloop_pipelines.steps import train

    ingest_and_preprocess(root, spec)
    prepared, model = root / "prepared", root / "model"
    train.run(
        spec, report=StepReport("", "train"), run_uri="", prepared_dir=prepared,
        params_path=root / "no-params.json", model_dir=model, curves_html=root / "curves.html",
    )  # fmt: skip
    return prepared, model


@pytest.fixture(scope="module")
def cancer_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The small MLP trained on breast cancer by the real steps: (prepared_dir, model_dir)."""
    return trained(tmp_path_factory.mktemp("cancer"), spec_for("builtin://breast-cancer", "label"))


class RecordingReport(StepReport):
    """The step record as the operator sees it, plus every update (writes are throttled)."""

    def __init__(self, run_uri: str, step: str) -> None:
        super().__init__(run_uri, step)
        self.updates: list[dict[str, Any]] = []

    @property
    def messages(self) -> list[str]:
        return [str(fields["message"]) for fields in self.updates if "message" in fields]

    def update(self, *, force: bool = False, **fields: Any) -> None:
        self.updates.append(fields)
        super().update(force=force, **fields)
