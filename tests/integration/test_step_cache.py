"""Caching that hits, end to end on the local executor: the same spec run twice (two attempts,
two run URIs) reuses ingest and preprocess from the run store's step cache; one row more in the
data and both run again.

(No ``from __future__ import annotations``, like test_executors.py.)
"""

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.backends.executor_local import LocalExecutor
from kubeloop_pipelines.compiler import compile_spec
from tests.integration.test_executors import finished, submission

CACHED = ("ingest", "preprocess")


def write_table(path: Path, rows: int) -> None:
    frame = pd.DataFrame(
        {
            "a": [float(i % 17) for i in range(rows)],
            "b": [float((i * 7) % 11) for i in range(rows)],
            "y": [int(i % 17 > 8) for i in range(rows)],
        }
    )
    frame.to_csv(path, index=False)


def spec_for(table: Path) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate(
        {
            "data": {"uri": f"file://{table}", "target": "y"},
            "model": {"epochs": 1, "hiddenLayers": [4], "batchSize": 64},
            "explanation": {"method": "none"},
            "resources": {"cpu": "1", "memory": "1Gi"},
            "registration": {"modelName": "cached"},
            "retries": 0,
        }
    )


async def run_attempt(
    executor: LocalExecutor, tmp_path: Path, ir_yaml: str, attempt: int
) -> dict[str, dict[str, Any]]:
    run_dir = tmp_path / "artifacts" / "team-a" / "cached" / f"attempt-{attempt}"
    sub = submission(
        ir_yaml, name="cached", attempt=attempt, run_uri=f"file://{run_dir}", timeout_s=600
    )
    seen = await finished(executor, sub, await executor.submit(sub), within=600)
    assert seen.state == "Succeeded", f"{seen.message}\n{seen.log_tail}"
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "steps").glob("*.json")}


async def test_a_retrain_on_unchanged_data_reuses_ingest_and_preprocess(
    local: LocalExecutor, tmp_path: Path
) -> None:
    table = tmp_path / "table.csv"
    write_table(table, 120)
    compiled = compile_spec(spec_for(table))
    cache = tmp_path / "artifacts" / "team-a" / ".cache"

    first = await run_attempt(local, tmp_path, compiled.ir_yaml, 1)
    assert set(first) == set(compiled.steps)  # the fingerprint task writes no step record
    assert [first[s]["cached"] for s in CACHED] == [False, False]
    assert "cached" not in first["train"]  # train is never reused
    fingerprint = first["ingest"]["data"]["fingerprint"]
    assert first["ingest"]["data"]["rows"] == 120

    second = await run_attempt(local, tmp_path, compiled.ir_yaml, 2)
    assert [second[s]["cached"] for s in CACHED] == [True, True]
    assert [second[s]["cacheKey"] for s in CACHED] == [first[s]["cacheKey"] for s in CACHED]
    assert second["ingest"]["data"]["fingerprint"] == fingerprint
    assert second["preprocess"]["metrics"] == first["preprocess"]["metrics"]
    assert all(r["state"] == "Succeeded" for r in second.values()), second
    # the published report is in the second attempt's own run directory too
    report = second["preprocess"]["published"]["data_quality_report"]
    assert (tmp_path / "artifacts" / "team-a" / "cached" / "attempt-2" / report).is_file()
    assert len(list(cache.glob("*/*/COMPLETE"))) == 2

    write_table(table, 121)  # one row more
    third = await run_attempt(local, tmp_path, compiled.ir_yaml, 3)
    assert [third[s]["cached"] for s in CACHED] == [False, False]
    assert third["ingest"]["data"]["fingerprint"] != fingerprint
    assert third["ingest"]["data"]["rows"] == 121
    assert len(list(cache.glob("*/*/COMPLETE"))) == 4
