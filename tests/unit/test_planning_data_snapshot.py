"""status.data: the ingest step's record carries the data snapshot into the TrainingRun."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kubeloop.api.training_run import TrainingRun, TrainingRunSpec, TrainingRunStatus
from kubeloop.planning.training_run import Observed, RunView, data_snapshot, plan_training

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
SPEC = TrainingRunSpec.model_validate(
    {"data": {"uri": "file:///data/t.csv", "target": "y"}, "registration": {"modelName": "m"}}
)
FINGERPRINT = "sha256:" + "ab" * 32


def ingest(state: str = "Succeeded", **extra: Any) -> dict[str, Any]:
    return {
        "step": "ingest",
        "state": state,
        "startedAt": "2026-12-02T11:00:00Z",
        "cached": True,
        "data": {
            "uri": "file:///data/t.csv",
            "fingerprint": FINGERPRINT,
            "rows": 569,
            "sources": 1,
        },
        **extra,
    }


def running() -> TrainingRunStatus:
    first = plan_training(SPEC, TrainingRunStatus(), Observed(generation=1, now=NOW))
    first.status.run_id = "local-1"
    return first.status


def test_the_ingest_record_fingerprint_reaches_the_status() -> None:
    steps = {"ingest": ingest()}
    obs = Observed(generation=1, now=NOW, run=RunView("Running"), steps=steps)
    status = plan_training(SPEC, running(), obs).status
    assert status.data is not None
    assert status.data.fingerprint == FINGERPRINT
    assert (status.data.uri, status.data.rows, status.data.sources) == (
        "file:///data/t.csv",
        569,
        1,
    )
    assert status.data.cached is True
    dumped = status.model_dump(by_alias=True, mode="json")["data"]
    assert dumped["fingerprint"] == FINGERPRINT  # status.data.fingerprint, as kubectl shows it


def test_no_snapshot_before_ingest_succeeded_or_from_a_record_without_one() -> None:
    assert data_snapshot(ingest(state="Running")) is None
    assert data_snapshot({"step": "ingest", "state": "Succeeded"}) is None
    assert data_snapshot({}) is None
    assert data_snapshot(ingest(data={"rows": "many"})) is None
    obs = Observed(generation=1, now=NOW, run=RunView("Running"), steps={})
    assert plan_training(SPEC, running(), obs).status.data is None


def test_a_new_attempt_starts_without_the_old_snapshot() -> None:
    status = running()
    obs = Observed(generation=1, now=NOW, run=RunView("Running"), steps={"ingest": ingest()})
    status = plan_training(SPEC, status, obs).status
    assert status.data is not None
    newer = plan_training(SPEC, status, Observed(generation=2, now=NOW, spec_hash="b" * 64))
    assert newer.status.attempt == 2
    assert newer.status.data is None


def test_the_fingerprint_is_a_wide_printer_column() -> None:
    columns = {c.name: c for c in TrainingRun.crd.columns}
    assert columns["Data"].json_path == ".status.data.fingerprint"
    assert columns["Data"].priority == 1
