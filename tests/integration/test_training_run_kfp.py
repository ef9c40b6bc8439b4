"""TrainingRun with the ``kfp`` executor: the real operator (kopf, against the real API server)
compiles the spec and drives ``KfpExecutor`` (the real ``kfp.Client``) against a FAKE Kubeflow
Pipelines API (``tests/fakes/kfp_api.py``).

Why a fake: the real KFP API server needs MySQL, Argo Workflows and an object store, which
cannot run on a test machine. The fake serves the v2beta1 endpoints ``kfp.Client`` calls at the
HTTP boundary, refuses anything that is not real KFP IR, records every request, and runs
nothing: each test plays the cluster's part by moving the fake's run states (``set_state``,
``fail_task``). In the success test, what the pipeline's pods would write into the run
directory is produced here by the real component bodies, in-process (see
``run_the_pipeline_pods``); that part is emulated, and said so there.

Covered: one experiment and one run per attempt with the compiled IR, re-attaching after
SIGKILL (including a kill between the run's creation and the status write), failure mapping to
the step, cancel on a spec change and on deletion, and registration on success.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kopf.testing import KopfRunner

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.backends.executor import run_display_name
from kubeloop.backends.kube import EVENTS, MODEL_VERSIONS, TRAINING_RUNS, KubeClient
from kubeloop.settings import Settings
from kubeloop_pipelines.compiler import compile_spec, selected_steps
from tests.fakes.kfp_api import API, FakeKfpApi, Recorded
from tests.integration.conftest import condition, eventually, operator_process

WITHIN = 30.0  # the daemon looks every 2 s at most; generous for a loaded machine


@dataclass
class FakeKfp(FakeKfpApi):
    """The fake, plus a way to hold the answer to a run's creation: while ``hold`` is set, a
    new run is stored (KFP has it) but its creator waits for the answer until ``hold`` is set
    free, so a test can kill the operator between the submit and its status write."""

    hold: asyncio.Event | None = None

    async def _create_run(self, request: web.Request) -> web.Response:
        response = await super()._create_run(request)
        if self.hold is not None:
            await self.hold.wait()
        return response

    def run_creations(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == f"{API}/runs"]

    def terminations(self) -> list[str]:
        """Ids of the runs the operator asked KFP to terminate, in order."""
        return [
            r.path.removeprefix(f"{API}/runs/").removesuffix(":terminate")
            for r in self.requests
            if r.method == "POST" and r.path.endswith(":terminate")
        ]


def training_run(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "executor": "kfp",
        "data": {"uri": "builtin://breast-cancer", "target": "label"},
        "model": {"family": "mlp", "hiddenLayers": [16], "epochs": 4, "batchSize": 64},
        "evaluation": {"gates": [{"metric": "f1", "op": ">=", "value": 0.8}]},
        "explanation": {"method": "none"},
        "registration": {"modelName": "cancer"},
        "retries": 0,
        **spec,
    }
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {k: v for k, v in body.items() if v is not None},
    }


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def kfp_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeKfp]:
    """The fake KFP API, and the operator settings that point at it (set before any operator
    starts: they are read at start-up)."""
    fake = FakeKfp()
    async with fake:
        monkeypatch.setenv("KUBELOOP_KFP_HOST", fake.url)
        monkeypatch.setenv("KUBELOOP_EXECUTOR", "local")  # spec.executor=kfp must win
        monkeypatch.setenv("KUBELOOP_STATE_DIR", str(tmp_path / "state"))
        monkeypatch.setenv("KUBELOOP_SCRAPE_TARGETS_DIR", str(tmp_path / "targets"))
        yield fake
        if fake.hold is not None:
            fake.hold.set()


@pytest.fixture
async def kfp_operator(
    kfp_api: FakeKfp, namespace: str, artifact_root: Path
) -> AsyncIterator[KopfRunner]:
    """The real operator in-process (as conftest's ``operator``), started after the fake and
    stopped off the event loop: the fake is served by this loop, and a request the operator
    has in flight while it stops must still get its answer."""
    args = ["run", "--standalone", "--namespace", namespace, "-m", "kubeloop.handlers"]
    runner = KopfRunner(args, timeout=60)
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert runner.exception is None, runner.output[-4000:]


async def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the operator process and wait for it without blocking the fake's event loop."""
    if proc.poll() is None:
        proc.send_signal(sig)
    await asyncio.to_thread(proc.wait, 30)


# --- helpers -------------------------------------------------------------------------------


async def get_tr(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = await kube.get(TRAINING_RUNS, namespace, name)
    return obj


async def wait_status(
    kube: KubeClient, namespace: str, name: str, what: str, within: float = WITHIN, **want: Any
) -> dict[str, Any]:
    """The TrainingRun once every ``status.<key>`` equals ``want[key]`` (``...``: any
    non-empty value)."""

    async def check() -> dict[str, Any] | None:
        obj = await get_tr(kube, namespace, name)
        status = obj.get("status") or {}
        ok = all(bool(status.get(k)) if v is ... else status.get(k) == v for k, v in want.items())
        return obj if ok else None

    result: dict[str, Any] = await eventually(check, within=within, what=f"{name}: {what}")
    return result


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for a condition on the fake (``eventually`` for a plain predicate)."""

    async def check() -> bool:
        return predicate()

    await eventually(check, within=WITHIN, what=what)


def run_key(obj: dict[str, Any]) -> str:
    """``<name>-<first 8 hex digits of the uid>``: the run's name in executors and paths."""
    meta = obj["metadata"]
    return f"{meta['name']}-{meta['uid'].replace('-', '')[:8]}"


def expected_run_uri(artifact_root: Path, obj: dict[str, Any], attempt: int) -> str:
    namespace = obj["metadata"]["namespace"]
    return f"file://{artifact_root}/{namespace}/{run_key(obj)}/attempt-{attempt}"


def as_submitted(ir_yaml: str) -> dict[str, Any]:
    """The IR as ``kfp.Client`` puts it into ``pipeline_spec``: the PipelineSpec document, or
    {pipeline_spec, platform_spec} when a PlatformSpec follows (both through the protos)."""
    docs = [d for d in yaml.safe_load_all(ir_yaml) if d]
    pipeline = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform_doc: dict[str, Any] = {}
    for doc in docs[1:]:
        platform_doc.update(doc)
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    as_dict: dict[str, Any] = json_format.MessageToDict(pipeline)
    if platform == pipeline_spec_pb2.PlatformSpec():
        return as_dict
    return {"pipeline_spec": as_dict, "platform_spec": json_format.MessageToDict(platform)}


async def event_reasons(kube: KubeClient, namespace: str, name: str) -> list[str]:
    return [
        e["reason"]
        for e in await kube.list(EVENTS, namespace)
        if e["involvedObject"]["name"] == name
    ]


async def event_posted(kube: KubeClient, namespace: str, name: str, reason: str) -> None:
    """kopf posts Events in the background, after the status write: wait for the one named."""

    async def check() -> bool:
        return reason in await event_reasons(kube, namespace, name)

    await eventually(check, within=WITHIN, what=f"Event {reason} on {name}")


# --- 1. submit -----------------------------------------------------------------------------


async def test_submits_the_compiled_ir_once_into_the_namespace_experiment(
    kube: KubeClient,
    namespace: str,
    kfp_api: FakeKfp,
    kfp_operator: KopfRunner,
    artifact_root: Path,
) -> None:
    await kube.create(TRAINING_RUNS, namespace, training_run("cancer-kfp"))
    obj = await wait_status(
        kube, namespace, "cancer-kfp", "Running with a run id", phase="Running", runId=...
    )
    status = obj["status"]
    (run,) = kfp_api.runs.values()
    assert status["runId"] == run["run_id"]
    assert status["attempt"] == 1

    # One experiment for the namespace; the run lives in it, named after the attempt.
    (experiment,) = kfp_api.experiments.values()
    assert experiment["display_name"] == f"kubeloop-{namespace}"
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["display_name"] == run_display_name(namespace, run_key(obj), 1)
    uri = expected_run_uri(artifact_root, obj, 1)
    assert run["runtime_config"]["parameters"] == {"run_uri": uri}

    # The submitted pipeline is the IR the compiler makes of this spec (the fake parsed it into
    # the KFP protos), and specHash is that IR's digest.
    spec = TrainingRunSpec.model_validate(obj["spec"])
    settings = Settings()
    compiled = compile_spec(spec, image=settings.training_image, kueue_queue=settings.kueue_queue)
    assert run["pipeline_name"] == "kubeloop-cancer"
    assert run["pipeline_spec"] == as_submitted(compiled.ir_yaml)
    assert status["specHash"] == compiled.spec_hash
    assert status["specHash"] == hashlib.sha256(compiled.ir_yaml.encode()).hexdigest()

    # The fake ran nothing (the run is PENDING): more passes never submit again.
    kfp_api.set_state(run["run_id"], "RUNNING")
    await asyncio.sleep(3)
    assert len(kfp_api.run_creations()) == 1
    assert len(kfp_api.runs) == 1
    again = await get_tr(kube, namespace, "cancer-kfp")
    assert (again["status"]["phase"], again["status"]["runId"]) == ("Running", run["run_id"])
    ready = condition(again, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "Running")
    await event_posted(kube, namespace, "cancer-kfp", "Submitted")


# --- 2. restarts -----------------------------------------------------------------------------


async def test_a_killed_operator_reattaches_to_its_run(
    kube: KubeClient,
    namespace: str,
    kfp_api: FakeKfp,
    artifact_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator as a process with ``KUBELOOP_EXECUTOR=kfp`` (the spec says ``default``),
    SIGKILLed twice: inside the submit (KFP created the run, the status was never written),
    then while the run is RUNNING. Each restart finds the same run; none submits a second."""
    monkeypatch.setenv("KUBELOOP_EXECUTOR", "kfp")
    log = tmp_path / "operator.log"
    kfp_api.hold = asyncio.Event()
    proc = operator_process(namespace, artifact_root, log)
    try:
        await kube.create(TRAINING_RUNS, namespace, training_run("resume", executor=None))
        await until(lambda: len(kfp_api.runs) == 1, "the run is created")
        (run_id,) = kfp_api.runs
        await stop(proc, signal.SIGKILL)  # its POST /runs is still waiting for the answer
        kfp_api.hold.set()
        kfp_api.hold = None
        killed_at = len(kfp_api.requests)
        unwritten = await get_tr(kube, namespace, "resume")
        assert not (unwritten.get("status") or {}).get("runId"), unwritten.get("status")

        proc = operator_process(namespace, artifact_root, log)
        obj = await wait_status(
            kube, namespace, "resume", "re-attached", phase="Running", runId=run_id
        )
        assert obj["status"]["attempt"] == 1
        # It submitted attempt 1 again, and KfpExecutor found the run by its name instead.
        display = run_display_name(namespace, run_key(obj), 1)
        lookups = [
            r
            for r in kfp_api.requests[killed_at:]
            if r.method == "GET"
            and r.path == f"{API}/runs"
            and display in r.query.get("filter", "")
        ]
        assert lookups
        assert len(kfp_api.run_creations()) == 1
        assert list(kfp_api.runs) == [run_id]

        kfp_api.set_state(run_id, "RUNNING")
        await asyncio.sleep(2)  # a pass of the daemon on a RUNNING run
        await stop(proc, signal.SIGKILL)
        proc = operator_process(namespace, artifact_root, log)
        # The new process tracks the same run: it sees it fail (and says which step).
        kfp_api.fail_task(run_id, "Evaluate model", "the container was evicted")
        done = await wait_status(kube, namespace, "resume", "Failed", phase="Failed")
        assert (done["status"]["runId"], done["status"]["attempt"]) == (run_id, 1)
        assert "step evaluate failed" in (condition(done, "Ready") or {}).get("message", "")
        assert len(kfp_api.run_creations()) == 1
        assert list(kfp_api.runs) == [run_id]
        assert not kfp_api.terminations()
    finally:
        await stop(proc)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]


# --- 3. failure ------------------------------------------------------------------------------


async def test_a_failed_task_fails_the_run_naming_the_step(
    kube: KubeClient, namespace: str, kfp_api: FakeKfp, kfp_operator: KopfRunner
) -> None:
    await kube.create(TRAINING_RUNS, namespace, training_run("oom"))
    obj = await wait_status(kube, namespace, "oom", "Running", phase="Running", runId=...)
    run_id = obj["status"]["runId"]
    kfp_api.set_state(run_id, "RUNNING")
    kfp_api.fail_task(run_id, "Train model", "OOMKilled: the container used 2Gi")

    done = await wait_status(kube, namespace, "oom", "Failed", phase="Failed")
    ready = condition(done, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "StepFailed")
    # KfpExecutor names the task and its step; the planner leads with the step.
    assert ready["message"].startswith("step train failed"), ready["message"]
    assert "task 'Train model' failed: OOMKilled: the container used 2Gi" in ready["message"]
    assert done["status"]["completedAt"]
    await event_posted(kube, namespace, "oom", "StepFailed")

    await asyncio.sleep(3)  # a failed attempt stays failed: no new run, nothing terminated
    again = await get_tr(kube, namespace, "oom")
    assert (again["status"]["phase"], again["status"]["attempt"]) == ("Failed", 1)
    assert len(kfp_api.run_creations()) == 1
    assert not kfp_api.terminations()
    assert await kube.list(MODEL_VERSIONS, namespace) == []


async def test_a_pipeline_kfp_refuses_fails_the_run(
    kube: KubeClient, namespace: str, kfp_api: FakeKfp, kfp_operator: KopfRunner
) -> None:
    kfp_api.fail_next("POST", f"{API}/runs", 400, times=100, message="pipeline refused by KFP")
    await kube.create(TRAINING_RUNS, namespace, training_run("refused"))
    await until(lambda: bool(kfp_api.run_creations()), "the refused submit")
    done = await wait_status(kube, namespace, "refused", "Failed", within=8, phase="Failed")
    ready = condition(done, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "ExecutorRejected")
    assert "pipeline refused by KFP" in ready["message"]
    assert not kfp_api.runs


# --- 4. a spec change ----------------------------------------------------------------------


async def test_a_spec_change_terminates_the_run_and_submits_attempt_2(
    kube: KubeClient, namespace: str, kfp_api: FakeKfp, kfp_operator: KopfRunner
) -> None:
    await kube.create(TRAINING_RUNS, namespace, training_run("changing"))
    first = await wait_status(kube, namespace, "changing", "Running", phase="Running", runId=...)
    old = first["status"]["runId"]
    kfp_api.set_state(old, "RUNNING")

    await kube.patch(TRAINING_RUNS, namespace, "changing", {"spec": {"model": {"epochs": 3}}})
    second = await wait_status(
        kube, namespace, "changing", "attempt 2 Running", attempt=2, phase="Running", runId=...
    )
    new = second["status"]["runId"]
    assert new != old
    assert kfp_api.terminations() == [old]
    assert kfp_api.runs[old]["state"] == "CANCELED"
    assert len(kfp_api.run_creations()) == 2
    assert kfp_api.runs[new]["display_name"] == run_display_name(namespace, run_key(second), 2)
    assert kfp_api.runs[new]["experiment_id"] == kfp_api.runs[old]["experiment_id"]
    assert second["status"]["specHash"] != first["status"]["specHash"]
    assert second["status"]["observedGeneration"] == second["metadata"]["generation"]
    history = [(h["number"], h["runId"], h["result"]) for h in second["status"]["history"]]
    assert history == [(1, old, "Superseded")]
    await event_posted(kube, namespace, "changing", "Superseded")

    # Deleting the TrainingRun stops its running attempt too.
    kfp_api.set_state(new, "RUNNING")
    await kube.delete(TRAINING_RUNS, namespace, "changing")
    await until(lambda: kfp_api.terminations() == [old, new], "both runs terminated")
    assert kfp_api.runs[new]["state"] == "CANCELED"


# --- 5. success --------------------------------------------------------------------------------


@dataclass
class PodArtifact:
    """What a KFP task hands a component body for an input or output artifact: a local path
    (KFP mounts or downloads the object store there), plus the metrics loggers."""

    path: str
    logged: dict[str, Any] = field(default_factory=dict)

    def log_metric(self, metric: str, value: float) -> None:
        self.logged[metric] = value

    def log_confusion_matrix(self, categories: list[str], matrix: list[list[int]]) -> None:
        self.logged["confusionMatrix"] = {"categories": categories, "matrix": matrix}

    def log_roc_curve(self, fpr: list[float], tpr: list[float], threshold: list[float]) -> None:
        self.logged["roc"] = len(fpr)


def run_the_pipeline_pods(run: dict[str, Any], outputs: Path) -> list[str]:
    """EMULATED: what the pipeline's pods do for ``run``, as recorded by the fake.

    No KFP cluster runs here, so this calls the real component bodies
    (``kubeloop_pipelines.components``: ``run_step`` around the real steps, as the training
    image does) in this process, in the DAG's order, with the spec and ``run_uri`` taken from
    what the operator submitted (the IR's ``spec_json`` default, the run's ``run_uri``
    parameter). Artifacts that KFP would keep in its object store go under ``outputs``; the
    steps write the run directory (step records, ``evaluation.json``, ``model/``,
    ``modelversion.json``) themselves. Returns the steps it ran."""
    import torch

    from kubeloop_pipelines import components as c

    submitted = run["pipeline_spec"]
    pipeline = submitted.get("pipeline_spec", submitted)
    spec_json = pipeline["root"]["inputDefinitions"]["parameters"]["spec_json"]["defaultValue"]
    run_uri = run["runtime_config"]["parameters"]["run_uri"]
    steps = list(selected_steps(TrainingRunSpec.model_validate_json(spec_json)))
    assert steps == ["ingest", "preprocess", "train", "evaluate", "register"], steps
    dag = pipeline["root"]["dag"]["tasks"]
    # caching (the default): the uncached fingerprint task first (no step of its own)
    assert set(dag) == {"fingerprint", *steps[:-1], "condition-1"}

    def out(task: str, name: str) -> PodArtifact:
        return PodArtifact(str(outputs / task / name))

    def sliced(task: str) -> str:
        """The spec slice the IR gives a cached task (its cache key holds no run_uri)."""
        return str(dag[task]["inputs"]["parameters"]["spec_json"]["runtimeValue"]["constant"])

    common = {"spec_json": spec_json, "run_uri": run_uri}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: one thread is faster on a shared machine
    try:
        fingerprint = c.fingerprint(spec_json=sliced("fingerprint"))
        dataset = out("ingest", "dataset")
        c.ingest(
            spec_json=sliced("ingest"), data_fingerprint=fingerprint,
            dataset=dataset, summary=out("ingest", "summary"),
        )  # fmt: skip
        prepared = out("preprocess", "prepared")
        c.preprocess(
            spec_json=sliced("preprocess"), data_fingerprint=fingerprint, raw=dataset,
            prepared=prepared, report=out("preprocess", "report"),
            metrics=out("preprocess", "metrics"),
        )  # fmt: skip
        model = out("train", "model")
        c.train(
            **common, prepared=prepared, model=model,
            curves=out("train", "curves"), metrics=out("train", "metrics"),
        )  # fmt: skip
        evaluation = out("evaluate", "evaluation")
        passed = c.evaluate(
            **common, prepared=prepared, model=model, evaluation=evaluation,
            metrics=out("evaluate", "metrics"), classification=out("evaluate", "classification"),
            report=out("evaluate", "report"),
        )  # fmt: skip
        if not passed:  # the IR's gates-passed condition
            return steps[:-1]
        c.register(
            **common, raw=dataset, model=model, evaluation=evaluation,
            manifest=out("register", "manifest"),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return steps


async def test_a_succeeded_run_registers_the_model_version(
    kube: KubeClient,
    namespace: str,
    kfp_api: FakeKfp,
    kfp_operator: KopfRunner,
    artifact_root: Path,
    tmp_path: Path,
) -> None:
    await kube.create(TRAINING_RUNS, namespace, training_run("cancer-ok"))
    obj = await wait_status(kube, namespace, "cancer-ok", "Running", phase="Running", runId=...)
    run_id = obj["status"]["runId"]
    run = kfp_api.runs[run_id]
    run_dir = Path(expected_run_uri(artifact_root, obj, 1).removeprefix("file://"))
    assert run["runtime_config"]["parameters"]["run_uri"] == f"file://{run_dir}"

    kfp_api.set_state(run_id, "RUNNING")
    ran = await asyncio.to_thread(run_the_pipeline_pods, run, tmp_path / "kfp-object-store")
    assert ran[-1] == "register", "the gates did not pass"
    for name in ("evaluation.json", "modelversion.json", "model/model.pt2", "steps/train.json"):
        assert (run_dir / name).is_file(), name
    # While KFP still says RUNNING, the operator shows the steps' progress.
    await wait_status(kube, namespace, "cancer-ok", "step register", currentStep="register")
    kfp_api.set_state(run_id, "SUCCEEDED")

    done = await wait_status(kube, namespace, "cancer-ok", "Succeeded", phase="Succeeded")
    status = done["status"]
    assert status["modelVersion"] == "cancer-v1"
    assert status["runId"] == run_id
    assert status["metrics"]["f1"] >= 0.8
    assert status["artifacts"]["model"] == f"file://{run_dir}/model"
    ready = condition(done, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("True", "Registered")
    gates = condition(done, "GatesPassed")
    assert gates is not None
    assert gates["status"] == "True"

    mv = await kube.get(MODEL_VERSIONS, namespace, "cancer-v1")
    assert mv["spec"]["version"] == 1
    assert mv["spec"]["artifact"]["uri"] == f"file://{run_dir}/model"
    lineage = mv["spec"]["lineage"]
    assert (lineage["pipelineRunId"], lineage["specHash"]) == (run_id, status["specHash"])
    assert lineage["trainingRun"] == "cancer-ok"
    assert mv["metadata"]["labels"]["kubeloop.dev/attempt"] == "1"

    async def verified() -> bool:  # the registry checks the real artifact's digest
        got = await kube.get(MODEL_VERSIONS, namespace, "cancer-v1")
        return (got.get("status") or {}).get("phase") == "Ready"

    await eventually(verified, within=WITHIN, what="cancer-v1 Ready")
    assert len(kfp_api.run_creations()) == 1
    assert json.loads((run_dir / "evaluation.json").read_text())["gatesPassed"] is True
