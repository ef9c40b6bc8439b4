"""Reading a run directory through fsspec: a local path, and an in-memory filesystem standing
in for an object store (same code path as s3:// and gs://)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest

from kubeloop.backends.executor import ExecutorError
from kubeloop.backends.run_store import RunStore


def write_run(uri: str) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    files = {
        "steps/ingest.json": json.dumps({"step": "ingest", "state": "Succeeded"}),
        "steps/train.json": json.dumps({"step": "train", "state": "Running"}),
        "steps/broken.json": "{not json",
        "evaluation.json": json.dumps({"gatesPassed": True, "metrics": {"f1": 0.97}}),
        "model/model.json": "{}",
        "reports/evaluation.html": "<html></html>",
        "plots/learning-curves.png": "png",
    }
    for name, text in files.items():
        fs.makedirs(f"{root}/{name}".rsplit("/", 1)[0], exist_ok=True)
        with fs.open(f"{root}/{name}", "w") as fh:
            fh.write(text)


@pytest.fixture(params=["file", "memory"])
def run_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/run"
    return f"memory://runs/{uuid.uuid4().hex}/attempt-1"


def test_records_evaluation_and_artifacts_are_read(run_uri: str) -> None:
    write_run(run_uri)
    store = RunStore(run_uri)
    assert store.steps() == {
        "ingest": {"step": "ingest", "state": "Succeeded"},
        "train": {"step": "train", "state": "Running"},
    }
    assert store.read_json("evaluation.json") == {"gatesPassed": True, "metrics": {"f1": 0.97}}
    assert store.read_json("modelversion.json") is None
    assert store.exists("evaluation.json")
    assert not store.exists("modelversion.json")
    assert store.artifacts() == {
        "model": f"{run_uri}/model",
        "evaluation": f"{run_uri}/evaluation.json",
        "report:evaluation": f"{run_uri}/reports/evaluation.html",
        "plot:learning-curves": f"{run_uri}/plots/learning-curves.png",
    }


def test_an_empty_run_directory_reads_as_nothing(run_uri: str) -> None:
    store = RunStore(run_uri)
    assert store.steps() == {}
    assert store.artifacts() == {}


def test_an_unknown_scheme_is_a_clear_permanent_error() -> None:
    with pytest.raises(ExecutorError, match="cannot read the run directory") as info:
        RunStore("nosuchscheme://bucket/run")
    assert not info.value.temporary
