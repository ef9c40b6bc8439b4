"""TrainingRun end to end: the real operator against the real API server compiles the spec,
the local executor runs the compiled KFP pipeline with ``kfp.local`` (real components: pandas,
scikit-learn, torch), and the operator tracks the steps and registers the ModelVersion.

Runs are kept small (a few epochs on breast-cancer) so the suite stays short; the code path is
the one a large run takes.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.backends.kube import (
    EVENTS,
    MODEL_VERSIONS,
    RESOURCE_QUOTAS,
    TRAINING_RUNS,
    KubeClient,
)
from tests.integration.conftest import condition, eventually, operator_process

RUN_WITHIN = 240.0


def training_run(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "data": {"uri": "builtin://breast-cancer", "target": "label"},
        "model": {"family": "mlp", "hiddenLayers": [16], "epochs": 4, "batchSize": 64},
        "evaluation": {"gates": [{"metric": "f1", "op": ">=", "value": 0.8}]},
        "explanation": {"method": "none"},
        "registration": {"modelName": "cancer", "alias": "candidate"},
        "retries": 0,
    }
    for key, value in spec.items():
        body[key] = value
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": body,
    }


@pytest.fixture
def executor_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state = tmp_path / "state"
    monkeypatch.setenv("KUBELOOP_STATE_DIR", str(state))
    monkeypatch.setenv("KUBELOOP_EXECUTOR", "local")
    yield state
    # Pipeline runners are detached by design; the test must not leak them.
    LocalExecutor(state).stop_all()


async def wait_phase(
    kube: KubeClient, namespace: str, name: str, phases: tuple[str, ...], within: float = RUN_WITHIN
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        obj = await kube.get(TRAINING_RUNS, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    result: dict[str, Any] = await eventually(
        check, within=within, interval=1.0, what=f"{name} in {phases}"
    )
    return result


async def reasons_of_events(kube: KubeClient, namespace: str, name: str) -> list[str]:
    items = await kube.list(EVENTS, namespace)
    return [e["reason"] for e in items if e["involvedObject"]["name"] == name]


async def test_a_run_trains_evaluates_explains_and_registers(
    kube: KubeClient,
    namespace: str,
    executor_state: Path,
    operator: KopfRunner,
    artifact_root: Path,
) -> None:
    body = training_run(
        "cancer-mlp",
        tuning={
            "algorithm": "random",
            "maxTrials": 3,
            "objective": {"metric": "f1", "direction": "maximize"},
            "searchSpace": [
                {"name": "learningRate", "type": "float", "min": 0.001, "max": 0.01, "log": True}
            ],
        },
        explanation={"method": "permutation", "samples": 20},
    )
    await kube.create(TRAINING_RUNS, namespace, body)

    running = await wait_phase(kube, namespace, "cancer-mlp", ("Running", "Succeeded", "Failed"))
    assert running["status"]["attempt"] == 1
    assert len(running["status"]["specHash"]) == 64

    done = await wait_phase(kube, namespace, "cancer-mlp", ("Succeeded", "Failed"))
    status = done["status"]
    assert status["phase"] == "Succeeded", json.dumps(status)[:3000]
    ready = condition(done, "Ready")
    assert ready is not None
    assert ready["status"] == "True"
    gates = condition(done, "GatesPassed")
    assert gates is not None
    assert gates["status"] == "True"
    assert "f1=" in gates["message"]
    assert status["metrics"]["f1"] >= 0.8
    assert status["bestMetric"].startswith("f1=")
    assert status["trials"]["progress"] == "3/3"
    assert status["trials"]["bestParams"]
    assert status["modelVersion"] == "cancer-v1"
    assert status["artifacts"]["model"].endswith("/attempt-1/model")
    assert any(k.startswith("report:") for k in status["artifacts"])
    run_dir = Path(status["artifacts"]["model"].removeprefix("file://")).parent
    assert run_dir.is_relative_to(artifact_root / namespace)
    assert (run_dir / "model" / "model.pt2").is_file()
    assert (run_dir / "evaluation.json").is_file()

    mv = await kube.get(MODEL_VERSIONS, namespace, "cancer-v1")
    spec = mv["spec"]
    assert spec["version"] == 1
    assert spec["artifact"]["uri"] == status["artifacts"]["model"]
    assert len(spec["artifact"]["sha256"]) == 64
    assert spec["lineage"]["trainingRun"] == "cancer-mlp"
    assert spec["lineage"]["specHash"] == status["specHash"]
    assert len(spec["signature"]["inputs"]) == 30
    assert len(spec["reference"]) == 30
    assert spec["aliases"] == ["candidate"]
    assert mv["metadata"]["labels"]["kubeloop.dev/training-run"] == "cancer-mlp"

    async def registry_ready() -> bool:
        obj = await kube.get(MODEL_VERSIONS, namespace, "cancer-v1")
        return (obj.get("status") or {}).get("phase") == "Ready"

    # The registry verifies the published artifact's digest before it calls the version Ready.
    await eventually(registry_ready, within=30, what="cancer-v1 Ready")

    async def story_told() -> bool:
        # kopf posts Events in the background, after the status write
        seen = await reasons_of_events(kube, namespace, "cancer-mlp")
        return all(r in seen for r in ("AttemptStarted", "Submitted", "StepStarted", "Registered"))

    await eventually(story_told, within=30, what="the run's Events")


async def test_bad_input_fails_naming_the_field_and_registers_nothing(
    kube: KubeClient, namespace: str, executor_state: Path, operator: KopfRunner
) -> None:
    await kube.create(
        TRAINING_RUNS,
        namespace,
        training_run("no-target", data={"uri": "builtin://breast-cancer", "target": "outcome"}),
    )
    done = await wait_phase(kube, namespace, "no-target", ("Succeeded", "Failed"))
    ready = condition(done, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "InvalidInput")
    assert "step ingest failed: spec.data.target" in ready["message"]
    assert "outcome" in ready["message"]
    await asyncio.sleep(3)  # a crash loop would start attempt 2 or flip the phase
    again = await kube.get(TRAINING_RUNS, namespace, "no-target")
    assert again["status"]["attempt"] == 1
    assert again["status"]["phase"] == "Failed"
    assert await kube.list(MODEL_VERSIONS, namespace) == []


async def test_failed_gates_register_nothing(
    kube: KubeClient, namespace: str, executor_state: Path, operator: KopfRunner
) -> None:
    body = training_run(
        "strict", evaluation={"gates": [{"metric": "accuracy", "op": ">=", "value": 0.9999}]}
    )
    await kube.create(TRAINING_RUNS, namespace, body)
    done = await wait_phase(kube, namespace, "strict", ("Succeeded", "Failed"))
    gates = condition(done, "GatesPassed")
    assert gates is not None
    assert gates["status"] == "False"
    assert "accuracy=" in gates["message"]
    ready = condition(done, "Ready")
    assert ready is not None
    assert ready["reason"] == "GatesFailed"
    assert await kube.list(MODEL_VERSIONS, namespace) == []


async def test_gpu_budget_queues_runs_and_refuses_impossible_requests(
    kube: KubeClient, namespace: str, executor_state: Path, operator: KopfRunner
) -> None:
    await kube.create(
        RESOURCE_QUOTAS,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "gpus"},
            "spec": {"hard": {"requests.nvidia.com/gpu": "1"}},
        },
    )
    await kube.create(TRAINING_RUNS, namespace, training_run("huge", resources={"gpu": 4}))
    huge = await wait_phase(kube, namespace, "huge", ("Failed",), within=30)
    ready = condition(huge, "Ready")
    assert ready is not None
    assert ready["reason"] == "GpuRequestImpossible"
    assert "spec.resources.gpu=4" in ready["message"]
    assert "ResourceQuota gpus" in ready["message"]

    await kube.create(TRAINING_RUNS, namespace, training_run("first", resources={"gpu": 1}))
    await wait_phase(kube, namespace, "first", ("Running",), within=30)
    await kube.create(TRAINING_RUNS, namespace, training_run("second", resources={"gpu": 1}))
    queued = await wait_phase(kube, namespace, "second", ("Queued",), within=30)
    assert "1 of 1 in use" in (condition(queued, "Ready") or {}).get("message", "")
    # when the first run finishes, the queued one is admitted — never failed, never overrun
    await wait_phase(kube, namespace, "first", ("Succeeded", "Failed"))
    second = await wait_phase(kube, namespace, "second", ("Running", "Succeeded"), within=30)
    assert second["status"]["attempt"] == 1


async def test_a_suspended_run_waits_for_the_approve_annotation(
    kube: KubeClient, namespace: str, executor_state: Path, operator: KopfRunner
) -> None:
    await kube.create(TRAINING_RUNS, namespace, training_run("held", suspend=True))
    held = await wait_phase(kube, namespace, "held", ("Suspended",), within=30)
    progressing = condition(held, "Progressing")
    assert progressing is not None
    assert (progressing["status"], progressing["reason"]) == ("False", "AwaitingApproval")
    assert "kubectl annotate trainingrun held kubeloop.dev/approve=true" in progressing["message"]
    await asyncio.sleep(5)  # a few polls: still held, nothing submitted
    again = await kube.get(TRAINING_RUNS, namespace, "held")
    assert again["status"]["phase"] == "Suspended"
    assert again["status"]["attempt"] == 1
    assert not again["status"].get("runId")
    assert (await reasons_of_events(kube, namespace, "held")).count("Suspended") == 1

    annotate = {"metadata": {"annotations": {"kubeloop.dev/approve": "true"}}}
    await kube.patch(TRAINING_RUNS, namespace, "held", annotate)
    done = await wait_phase(kube, namespace, "held", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"])[:3000]
    assert done["status"]["attempt"] == 1
    assert done["status"]["modelVersion"] == "cancer-v1"

    async def approval_told() -> bool:
        seen = await reasons_of_events(kube, namespace, "held")
        return seen.count("Suspended") == 1 and "Approved" in seen

    await eventually(approval_told, within=30, what="the Suspended and Approved Events")


async def test_restart_resumes_the_run_and_a_spec_change_starts_a_new_attempt(
    kube: KubeClient,
    namespace: str,
    executor_state: Path,
    artifact_root: Path,
    tmp_path: Path,
) -> None:
    log = tmp_path / "operator.log"
    proc = operator_process(namespace, artifact_root, log)
    try:
        await kube.create(TRAINING_RUNS, namespace, training_run("resume"))
        running = await wait_phase(kube, namespace, "resume", ("Running",), within=60)
        run_id = running["status"]["runId"]
        assert run_id
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = operator_process(namespace, artifact_root, log)
        done = await wait_phase(kube, namespace, "resume", ("Succeeded", "Failed"))
        assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"])[:3000]
        assert done["status"]["runId"] == run_id
        assert done["status"]["attempt"] == 1
        runs = list((executor_state / "training" / namespace).glob("resume-*/attempt-*"))
        assert [p.name for p in runs] == ["attempt-1"]
        assert [m["metadata"]["name"] for m in await kube.list(MODEL_VERSIONS, namespace)] == [
            "cancer-v1"
        ]

        # A spec change starts attempt 2; attempt 1 stays in the history.
        await kube.patch(TRAINING_RUNS, namespace, "resume", {"spec": {"model": {"epochs": 3}}})

        async def second_attempt() -> dict[str, Any] | None:
            obj = await kube.get(TRAINING_RUNS, namespace, "resume")
            status = obj.get("status") or {}
            return (
                obj if status.get("attempt") == 2 and status.get("phase") == "Succeeded" else None
            )

        again = await eventually(second_attempt, within=RUN_WITHIN, interval=1.0, what="attempt 2")
        history = again["status"]["history"]
        assert [(h["number"], h["result"]) for h in history] == [(1, "Succeeded")]
        assert again["status"]["modelVersion"] == "cancer-v2"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
