"""The TrainingRun executors, without a cluster.

- ``KfpExecutor`` against a fake Kubeflow Pipelines API at the HTTP boundary
  (``tests/fakes/kfp_api.py``: the real API server needs MySQL, Argo and an object store), with
  the real ``kfp.Client`` and the real compiled IR.
- ``LocalExecutor`` running real pipelines through ``kfp.local`` in detached runner processes:
  small pipelines compiled here (retries, failures, timeouts, restarts) and, once the step
  modules exist, the real breast-cancer pipeline end to end.

(No ``from __future__ import annotations``: KFP reads the annotations of the components here.)
"""

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kfp import compiler, dsl
from kfp.dsl import Artifact, Output

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.backends.executor import (
    ExecutorError,
    RunObservation,
    Submission,
    run_display_name,
)
from kubeloop.backends.executor_kfp import KfpExecutor
from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.contract.steps import MANIFEST_FILE
from kubeloop_pipelines.compiler import compile_spec
from tests.conftest import ROOT
from tests.fakes.kfp_api import FakeKfpApi

SPEC = TrainingRunSpec.model_validate(
    {
        "data": {"uri": "builtin://breast-cancer", "target": "label"},
        "model": {"epochs": 3, "hiddenLayers": [16]},
        "explanation": {"method": "none"},
        "resources": {"cpu": "1", "memory": "1Gi"},
        "registration": {"modelName": "cancer"},
        "retries": 0,
    }
)
IMAGE = "python:3.11"  # kfp.local's subprocess runner ignores it (it warns on non-python ones)
RUNNER = "kubeloop_pipelines.local_runner"


def submission(
    ir_yaml: str,
    *,
    namespace: str = "team-a",
    name: str = "cancer",
    attempt: int = 1,
    run_uri: str = "",
    arguments: dict[str, str] | None = None,
    timeout_s: float = 300,
) -> Submission:
    uri = run_uri or f"file:///tmp/kubeloop-test/{namespace}/{name}/attempt-{attempt}"
    return Submission(
        namespace=namespace,
        name=name,
        attempt=attempt,
        ir_yaml=ir_yaml,
        spec_hash=hashlib.sha256(ir_yaml.encode()).hexdigest(),
        run_uri=uri,
        arguments={"run_uri": uri} if arguments is None else arguments,
        timeout_s=timeout_s,
    )


# --- KfpExecutor against the fake API -------------------------------------------------------


@pytest.fixture
async def kfp_api() -> AsyncIterator[FakeKfpApi]:
    async with FakeKfpApi() as fake:
        yield fake


@pytest.fixture(scope="module")
def compiled_ir() -> str:
    return compile_spec(SPEC, kueue_queue="team-a").ir_yaml


async def test_kfp_submit_creates_one_experiment_per_namespace_and_one_run(
    kfp_api: FakeKfpApi, compiled_ir: str
) -> None:
    executor = KfpExecutor(kfp_api.url)
    sub = submission(compiled_ir)
    run_id = await executor.submit(sub)
    assert await executor.submit(sub) == run_id  # idempotent
    assert await KfpExecutor(kfp_api.url).submit(sub) == run_id  # a restarted operator too
    assert len(kfp_api.runs_named("team-a.cancer.attempt-1")) == 1
    assert len(kfp_api.calls("POST", "/apis/v2beta1/runs")) == 1

    other = await executor.submit(submission(compiled_ir, name="other"))
    elsewhere = await executor.submit(submission(compiled_ir, namespace="team-b"))
    assert len({run_id, other, elsewhere}) == 3
    names = sorted(e["display_name"] for e in kfp_api.experiments.values())
    assert names == ["kubeloop-team-a", "kubeloop-team-b"]

    run = kfp_api.runs[run_id]
    assert run["display_name"] == run_display_name("team-a", "cancer", 1)
    assert run["runtime_config"]["parameters"] == {"run_uri": sub.run_uri}
    assert run["pipeline_name"] == "kubeloop-cancer"
    platform = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]
    labels = platform["deploymentSpec"]["executors"]["exec-train"]["podMetadata"]["labels"]
    assert labels == {"kueue.x-k8s.io/queue-name": "team-a"}


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("PAUSED", "Running"),
        ("SUCCEEDED", "Succeeded"),
        ("FAILED", "Failed"),
        ("CANCELED", "Failed"),
    ],
)
async def test_kfp_states_map(
    kfp_api: FakeKfpApi, compiled_ir: str, state: str, expected: str
) -> None:
    executor = KfpExecutor(kfp_api.url)
    run_id = await executor.submit(submission(compiled_ir))
    kfp_api.set_state(run_id, state)
    seen = await executor.observe("team-a", "cancer", 1, run_id)
    assert (seen.state, seen.run_id) == (expected, run_id)


async def test_kfp_failure_names_the_task_and_step(kfp_api: FakeKfpApi, compiled_ir: str) -> None:
    executor = KfpExecutor(kfp_api.url)
    run_id = await executor.submit(submission(compiled_ir))
    kfp_api.fail_task(run_id, "Train model", "OOMKilled: the container used 1Gi")
    seen = await executor.observe("team-a", "cancer", 1, run_id)
    assert seen.state == "Failed"
    assert seen.failed_step == "train"
    assert "'Train model'" in seen.message
    assert "OOMKilled" in seen.message


async def test_kfp_unknown_run(kfp_api: FakeKfpApi) -> None:
    seen = await KfpExecutor(kfp_api.url).observe("team-a", "cancer", 1, "no-such-run")
    assert seen.state == "Unknown"


async def test_kfp_errors_are_mapped(kfp_api: FakeKfpApi, compiled_ir: str) -> None:
    executor = KfpExecutor(kfp_api.url)
    sub = submission(compiled_ir)
    kfp_api.fail_next("POST", "/apis/v2beta1/runs", 503, message="ml-pipeline is restarting")
    with pytest.raises(ExecutorError, match="HTTP 503: ml-pipeline is restarting") as err:
        await executor.submit(sub)
    assert err.value.temporary
    kfp_api.fail_next("GET", "/apis/v2beta1/runs", 500)
    with pytest.raises(ExecutorError) as err:
        await executor.submit(sub)
    assert err.value.temporary
    run_id = await executor.submit(sub)  # healed: exactly one run
    assert list(kfp_api.runs) == [run_id]

    kfp_api.fail_next("GET", f"/apis/v2beta1/runs/{run_id}", 403, message="not your namespace")
    with pytest.raises(ExecutorError, match="HTTP 403") as err:
        await executor.observe("team-a", "cancer", 1, run_id)
    assert not err.value.temporary


async def test_kfp_refuses_what_is_not_kfp_ir(kfp_api: FakeKfpApi, compiled_ir: str) -> None:
    """The fake checks the IR like the server would: a spec without tasks is a 400."""
    hollow = (
        compiled_ir.split("\nroot:\n", maxsplit=1)[0]
        + "\nroot:\n  dag: {}\n"
        + "schemaVersion: 2.1.0\n"
    )
    with pytest.raises(ExecutorError, match="HTTP 400: invalid pipeline spec") as err:
        await KfpExecutor(kfp_api.url).submit(submission(hollow))
    assert not err.value.temporary
    assert not kfp_api.runs


async def test_kfp_unreachable_is_temporary() -> None:
    executor = KfpExecutor("http://127.0.0.1:9", request_timeout=20)
    with pytest.raises(ExecutorError, match="unreachable") as err:
        await executor.submit(submission("pipelineInfo: {}"))
    assert err.value.temporary


async def test_kfp_cancel_and_timeout(kfp_api: FakeKfpApi, compiled_ir: str) -> None:
    executor = KfpExecutor(kfp_api.url)
    run_id = await executor.submit(submission(compiled_ir))
    kfp_api.set_state(run_id, "RUNNING")
    await executor.cancel("team-a", "cancer", 1, run_id)
    assert kfp_api.runs[run_id]["state"] == "CANCELED"
    assert (await executor.observe("team-a", "cancer", 1, run_id)).state == "Failed"
    await executor.cancel("team-a", "cancer", 1, run_id)  # finished: nothing to do

    late = await executor.submit(submission(compiled_ir, attempt=2, timeout_s=0.2))
    kfp_api.set_state(late, "RUNNING")
    await asyncio.sleep(0.3)
    seen = await executor.observe("team-a", "cancer", 2, late)
    assert (seen.state, seen.message) == ("Failed", "timed out after 0.2s (run terminated)")
    assert kfp_api.runs[late]["state"] == "CANCELED"


async def test_kfp_multi_user_experiments_live_in_the_namespace(compiled_ir: str) -> None:
    async with FakeKfpApi(multi_user=True) as fake:
        executor = KfpExecutor(fake.url, multi_user=True)
        await executor.submit(submission(compiled_ir, namespace="team-a"))
        await executor.submit(submission(compiled_ir, namespace="team-b"))
        owners = sorted(e["namespace"] for e in fake.experiments.values())
        assert owners == ["team-a", "team-b"]


# --- LocalExecutor: kfp.local in detached processes ------------------------------------------


def component(func: Callable[..., Any]) -> Any:
    return dsl.component(func, base_image=IMAGE, install_kfp_package=False)


def pipeline(name: str) -> Callable[[Callable[..., Any]], Any]:
    def build(func: Callable[..., Any]) -> Any:
        return dsl.pipeline(name=name)(func)

    return build


@component
def write_marker(marker: Output[Artifact]) -> None:
    """Writes a marker text (the test patches it in the IR)."""
    with open(marker.path, "w") as fh:
        fh.write("MARKER-original")


@component
def sleep_for(seconds: float) -> None:
    """Sleeps (a long step)."""
    import time

    print("sleeping", flush=True)
    time.sleep(seconds)


@component
def flaky(counter: str) -> None:
    """Fails on its first try only."""
    from pathlib import Path

    path = Path(counter)
    tries = int(path.read_text()) if path.exists() else 0
    path.write_text(str(tries + 1))
    if tries == 0:
        raise RuntimeError("the first try fails")


@component
def broken(message: str) -> None:
    """Always fails."""
    raise ValueError(message)


@component
def fails_permanently(run_uri: str) -> None:
    """Fails the way a step does on bad input: a permanent progress record, then an error."""
    from kubeloop_pipelines.progress import StepReport

    report = StepReport(run_uri, "train")
    report.started()
    report.failed("column 'label' not found", field="data.target", permanent=True)
    raise SystemExit(1)


@pipeline("marker-pipeline")
def marker_pipeline(run_uri: str = "") -> None:
    write_marker()


@pipeline("sleeping-pipeline")
def sleeping_pipeline(run_uri: str = "", seconds: float = 120.0) -> None:
    sleep_for(seconds=seconds)


@pipeline("flaky-pipeline")
def flaky_pipeline(counter: str, run_uri: str = "") -> None:
    flaky(counter=counter).set_retry(num_retries=1, backoff_duration="0s")


@pipeline("broken-pipeline")
def broken_pipeline(run_uri: str = "") -> None:
    broken(message="bad input").set_retry(num_retries=0)


@pipeline("permanent-pipeline")
def permanent_pipeline(run_uri: str) -> None:
    fails_permanently(run_uri=run_uri).set_retry(num_retries=2, backoff_duration="60s")


def local_submission(ir_yaml: str, tmp_path: Path, name: str, **kwargs: Any) -> Submission:
    """A submission whose run directory lies in the test's own tmp_path."""
    uri = f"file://{tmp_path / 'artifacts' / name}"
    return submission(ir_yaml, name=name, run_uri=uri, **kwargs)


def compile_ir(pipeline: Any, folder: Path) -> str:
    package = folder / f"{pipeline.name}.yaml"
    compiler.Compiler().compile(pipeline, package_path=str(package))
    return package.read_text()


def runner_processes(marker: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = entry.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if RUNNER in text and str(marker) in text:
            pids.append(int(entry.parent.name))
    return pids


async def until(check: Callable[[], Any], *, within: float = 120, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not reached in {within}s")


async def finished(
    executor: LocalExecutor, sub: Submission, run_id: str, within: float = 120
) -> RunObservation:
    async def done() -> RunObservation | None:
        seen = await executor.observe(sub.namespace, sub.name, sub.attempt, run_id)
        return seen if seen.state in ("Succeeded", "Failed", "Unknown") else None

    result: RunObservation = await until(done, within=within, what=f"run {run_id} finished")
    return result


async def test_local_runs_the_submitted_ir_itself(local: LocalExecutor, tmp_path: Path) -> None:
    """The runner executes the YAML it was given: a change made to the IR text (not to any
    Python function) shows in the output."""
    ir = compile_ir(marker_pipeline, tmp_path)
    assert "MARKER-original" in ir
    sub = local_submission(ir.replace("MARKER-original", "MARKER-patched"), tmp_path, "marker")
    run_id = await local.submit(sub)
    seen = await finished(local, sub, run_id)
    assert seen.state == "Succeeded", seen
    folder = local.run_dir(sub.namespace, sub.name, sub.attempt)
    (output,) = folder.glob("outputs/*/write-marker/marker")
    assert output.read_text() == "MARKER-patched"
    assert (folder / "pipeline.yaml").read_text() == sub.ir_yaml
    result = json.loads((folder / "result.json").read_text())
    assert result["state"] == "Succeeded"
    assert "finished with status SUCCESS" in result["logTail"]


async def test_local_resubmit_and_restart_reattach(local: LocalExecutor, tmp_path: Path) -> None:
    sub = local_submission(compile_ir(sleeping_pipeline, tmp_path), tmp_path, "sleepy")
    folder = local.run_dir(sub.namespace, sub.name, sub.attempt)
    run_id = await local.submit(sub)
    assert await local.submit(sub) == run_id
    restarted = LocalExecutor(local.root.parent)  # an operator that restarted
    assert await restarted.submit(sub) == run_id
    assert len(runner_processes(folder)) == 1
    assert (await restarted.observe("team-a", "sleepy", 1, run_id)).state == "Running"
    # The same attempt with another pipeline is refused while it runs.
    other = local_submission(sub.ir_yaml + "\n# changed\n", tmp_path, "sleepy")
    with pytest.raises(ExecutorError, match="is running pipeline") as err:
        await restarted.submit(other)
    assert not err.value.temporary

    await restarted.cancel("team-a", "sleepy", 1, run_id)
    seen = await local.observe("team-a", "sleepy", 1, run_id)
    assert (seen.state, seen.message) == ("Failed", "canceled")
    assert not runner_processes(folder)
    assert await local.submit(sub) == run_id  # still the same (ended) run: never a second one
    assert not runner_processes(folder)


async def test_local_killed_runner_fails_with_its_log(local: LocalExecutor, tmp_path: Path) -> None:
    sub = local_submission(compile_ir(sleeping_pipeline, tmp_path), tmp_path, "killed")
    folder = local.run_dir(sub.namespace, sub.name, sub.attempt)
    run_id = await local.submit(sub)
    log = folder / "run.log"
    await until(lambda: log.exists() and "sleeping" in log.read_text(), what="the task started")
    os.kill(int((folder / "pid").read_text()), signal.SIGKILL)
    seen = await finished(local, sub, run_id, within=30)
    assert (seen.state, seen.message) == ("Failed", "runner exited without a result")
    assert "sleeping" in seen.log_tail
    # The task it left behind is stopped too.
    await until(lambda: not any(str(folder) in _cmdline(p) for p in _all_pids()), within=10)


async def test_local_timeout(local: LocalExecutor, tmp_path: Path) -> None:
    sub = local_submission(compile_ir(sleeping_pipeline, tmp_path), tmp_path, "slow", timeout_s=3)
    run_id = await local.submit(sub)
    started = time.monotonic()
    seen = await finished(local, sub, run_id, within=60)
    assert (seen.state, seen.message) == ("Failed", "timed out after 3s")
    assert time.monotonic() - started < 30
    folder = local.run_dir(sub.namespace, sub.name, sub.attempt)
    await until(lambda: not runner_processes(folder), within=10, what="the runner stopped")


async def test_local_honours_task_retries(local: LocalExecutor, tmp_path: Path) -> None:
    counter = tmp_path / "tries.txt"
    ir = compile_ir(flaky_pipeline, tmp_path)
    sub = submission(ir, name="flaky", arguments={"counter": str(counter), "run_uri": ""})
    seen = await finished(local, sub, await local.submit(sub))
    assert seen.state == "Succeeded", seen
    assert counter.read_text() == "2"
    log = (local.run_dir("team-a", "flaky", 1) / "run.log").read_text()
    assert "Task flaky failed (attempt 1/2). Retrying in 0.0s" in log


async def test_local_failure_names_the_task_with_the_log(
    local: LocalExecutor, tmp_path: Path
) -> None:
    sub = local_submission(compile_ir(broken_pipeline, tmp_path), tmp_path, "broken")
    seen = await finished(local, sub, await local.submit(sub))
    assert seen.state == "Failed"
    assert seen.failed_step == "broken"
    assert "Inner task failed: 'broken'" in seen.message
    assert "ValueError: bad input" in seen.log_tail


async def test_local_permanent_failure_skips_the_retries(
    local: LocalExecutor, tmp_path: Path
) -> None:
    """Retries with a 60 s backoff, but the step said its failure is permanent: the run ends
    at once, naming the step, the field and the message."""
    sub = local_submission(compile_ir(permanent_pipeline, tmp_path), tmp_path, "bad")
    started = time.monotonic()
    seen = await finished(local, sub, await local.submit(sub), within=60)
    assert time.monotonic() - started < 30
    assert seen.state == "Failed"
    assert seen.failed_step == "train"
    assert seen.message == (
        "step train failed (data.target): column 'label' not found (permanent: not retried)"
    )


async def test_local_unknown_runs(local: LocalExecutor, tmp_path: Path) -> None:
    assert (await local.observe("team-a", "nothing", 1, "local-x")).state == "Unknown"
    sub = local_submission(compile_ir(marker_pipeline, tmp_path), tmp_path, "known")
    run_id = await local.submit(sub)
    assert (await local.observe("team-a", "known", 1, "local-other")).state == "Unknown"
    assert (await finished(local, sub, run_id)).state == "Succeeded"


STEP_MODULES = ("ingest", "preprocess", "train", "evaluate", "register")


@pytest.mark.skipif(
    not all(
        (ROOT / "pipelines" / "kubeloop_pipelines" / "steps" / f"{s}.py").exists()
        for s in STEP_MODULES
    ),
    reason="the step modules (steps/ingest, preprocess, train, evaluate, register) are not there",
)
async def test_local_trains_breast_cancer_end_to_end(local: LocalExecutor, tmp_path: Path) -> None:
    compiled = compile_spec(SPEC)
    assert compiled.steps == ("ingest", "preprocess", "train", "evaluate", "register")
    run_dir = tmp_path / "artifacts" / "team-a" / "cancer" / "attempt-1"
    sub = submission(compiled.ir_yaml, run_uri=f"file://{run_dir}", timeout_s=600)
    seen = await finished(local, sub, await local.submit(sub), within=600)
    assert seen.state == "Succeeded", f"{seen.message}\n{seen.log_tail}"
    records = {p.stem: json.loads(p.read_text()) for p in (run_dir / "steps").glob("*.json")}
    assert set(records) == set(compiled.steps)
    assert all(r["state"] == "Succeeded" for r in records.values()), records
    assert records["evaluate"]["outputs"]["gates_passed"] is True
    published = [p for r in records.values() for p in (r.get("published") or {}).values()]
    assert published
    assert all((run_dir / p).exists() for p in published), published
    assert (run_dir / MANIFEST_FILE).is_file()  # registered: the gates passed


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*")]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
