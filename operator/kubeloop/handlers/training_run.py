"""TrainingRun: compile the spec into a KFP pipeline, run it, track it, register the model.

One kopf daemon per TrainingRun is the only writer of its status. Every pass it compiles the
spec (cached per generation), looks at the GPU budget, the executor's run, the steps' progress
records and the evaluation, lets ``planning.training_run`` decide, and carries the decision
out: submit the attempt (executors are idempotent per attempt, so a restarted operator
re-attaches instead of starting a second run), cancel a superseded one, register the
ModelVersion when every gate passed. Then it writes status once and posts the Events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import kopf
import pydantic

from kubeloop import GROUP, VERSION, reasons
from kubeloop.api.model_version import ModelVersionSpec
from kubeloop.api.training_run import TrainingRun, TrainingRunStatus
from kubeloop.backends.executor import Executor, ExecutorError, Submission
from kubeloop.backends.kube import (
    MODEL_VERSIONS,
    RESOURCE_QUOTAS,
    TRAINING_RUNS,
    ApiError,
    KubeClient,
)
from kubeloop.backends.run_store import RunStore
from kubeloop.handlers import events
from kubeloop.handlers.errors import parse
from kubeloop.handlers.runtime import RECONCILE_SECONDS, RECONCILES, Runtime, runtime
from kubeloop.planning import training_run as plan
from kubeloop.planning.naming import child_name
from kubeloop.settings import Settings
from kubeloop_pipelines.contract import EVALUATION_FILE, MANIFEST_FILE

log = logging.getLogger("kubeloop.training")

TRAINING_RUN_LABEL = "kubeloop.dev/training-run"
ATTEMPT_LABEL = "kubeloop.dev/attempt"


@dataclass
class Compiled:
    generation: int
    spec_hash: str = ""
    ir_yaml: str = ""
    error: str = ""


@dataclass
class RunState:
    """What one daemon remembers between passes (status it wrote, the compiled pipeline)."""

    status: TrainingRunStatus | None = None
    compiled: Compiled | None = None
    last_steps: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_key(tr: TrainingRun) -> str:
    """The run's name in executors and artifact paths: name plus a piece of the uid, so a
    TrainingRun deleted and created again under the same name never sees the old runs."""
    uid = tr.metadata.uid.replace("-", "")[:8]
    return f"{tr.name}-{uid}" if uid else tr.name


def run_uri(settings: Settings, tr: TrainingRun, attempt: int) -> str:
    """The attempt's run directory, under the tenant's artifact prefix."""
    where = f"{tr.namespace}/{run_key(tr)}/attempt-{attempt}"
    if settings.object_store_prefix:
        return f"{settings.object_store_prefix.rstrip('/')}/{where}"
    return f"file://{settings.artifact_root}/{where}"


def executor_for(rt: Runtime, tr: TrainingRun) -> Executor:
    name = tr.spec.executor if tr.spec.executor != "default" else rt.settings.executor
    return rt.executor(name)


async def compile_run(rt: Runtime, tr: TrainingRun) -> Compiled:
    """The spec as KFP IR; a spec the compiler rejects becomes a message naming the field."""
    from kubeloop_pipelines.compiler import compile_spec

    generation = tr.metadata.generation
    problem = plan.spec_problem(tr.spec)
    if problem:
        return Compiled(generation, error=problem)
    try:
        compiled = await asyncio.to_thread(
            compile_spec,
            tr.spec,
            image=rt.settings.training_image,
            kueue_queue=rt.settings.kueue_queue,
        )
    except (ValueError, TypeError) as exc:
        return Compiled(generation, error=f"spec cannot be compiled into a pipeline: {exc}")
    return Compiled(generation, compiled.spec_hash, compiled.ir_yaml)


def _quantity(value: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        return 0


async def gpu_budget(rt: Runtime, tr: TrainingRun) -> tuple[int | None, str, int]:
    """(limit, where it comes from, GPUs held by the namespace's other running runs)."""
    ns, resource = tr.namespace, tr.spec.resources.gpu_resource
    limit, source = rt.settings.gpu_budget, "operator setting KUBELOOP_GPU_BUDGET"
    for quota in await rt.kube.list(RESOURCE_QUOTAS, ns):
        hard = (quota.get("spec") or {}).get("hard") or {}
        for key in (f"requests.{resource}", resource):
            if key in hard:
                value = _quantity(str(hard[key]))
                if limit is None or value < limit:
                    limit, source = value, f"ResourceQuota {quota['metadata']['name']}"
    if limit is None:
        return None, "", 0
    in_use = 0
    for other in await rt.kube.list(TRAINING_RUNS, ns):
        if other["metadata"]["name"] == tr.name:
            continue
        status = other.get("status") or {}
        if status.get("phase") == "Running":
            in_use += int(((other.get("spec") or {}).get("resources") or {}).get("gpu", 0))
    return limit, source, in_use


async def find_registered(kube: KubeClient, tr: TrainingRun, attempt: int) -> str:
    selector = f"{TRAINING_RUN_LABEL}={tr.name},{ATTEMPT_LABEL}={attempt}"
    found = await kube.list(MODEL_VERSIONS, tr.namespace, label_selector=selector)
    return str(found[0]["metadata"]["name"]) if found else ""


async def register(rt: Runtime, tr: TrainingRun, uri: str, run_id: str) -> str:
    """Create the ModelVersion from the register step's manifest: the next version number of
    the model, labelled with the run and attempt so a restart finds it instead of adding one."""
    attempt = tr.status.attempt
    existing = await find_registered(rt.kube, tr, attempt)
    if existing:
        return existing
    manifest = await asyncio.to_thread(RunStore(uri).read_json, MANIFEST_FILE)
    if manifest is None:
        raise ExecutorError(f"{uri}/{MANIFEST_FILE} is missing or unreadable", temporary=False)
    model = tr.spec.registration.model_name
    for _ in range(5):
        items = await rt.kube.request(
            "GET",
            MODEL_VERSIONS.path(tr.namespace),
            params={"fieldSelector": f"spec.modelName={model}"},
        )
        version = 1 + max((int(i["spec"]["version"]) for i in items.get("items", [])), default=0)
        spec = dict(manifest.get("spec") or {})
        spec.update(modelName=model, version=version)
        lineage = dict(spec.get("lineage") or {})
        lineage.update(trainingRun=tr.name, pipelineRunId=run_id, specHash=tr.status.spec_hash)
        spec["lineage"] = lineage
        ModelVersionSpec.model_validate(spec)  # the manifest becomes a model at the edge
        name = child_name(model, f"v{version}")
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelVersion",
            "metadata": {
                "name": name,
                "namespace": tr.namespace,
                "labels": {
                    **tr.spec.registration.labels,
                    TRAINING_RUN_LABEL: tr.name,
                    ATTEMPT_LABEL: str(attempt),
                },
            },
            "spec": spec,
        }
        try:
            await rt.kube.create(MODEL_VERSIONS, tr.namespace, body)
        except ApiError as exc:
            if exc.status == 409:  # another run took this version number: take the next
                continue
            raise
        return name
    raise ExecutorError(f"could not find a free version number for model {model!r}", temporary=True)


async def observe(rt: Runtime, tr: TrainingRun, state: RunState) -> tuple[plan.Observed, Executor]:
    status, now = tr.status, dt.datetime.now(dt.UTC)
    generation = tr.metadata.generation
    if state.compiled is None or state.compiled.generation != generation:
        state.compiled = await compile_run(rt, tr)
    compiled = state.compiled
    executor = executor_for(rt, tr)
    fields: dict[str, Any] = {
        "generation": generation,
        "now": now,
        "spec_hash": compiled.spec_hash,
        "compile_error": compiled.error,
    }
    starting = status.attempt == 0 or status.observed_generation != generation
    if starting or status.phase in ("Pending", "Queued"):
        limit, source, in_use = await gpu_budget(rt, tr)
        fields.update(gpu_limit=limit, gpu_limit_source=source, gpu_in_use=in_use)
    if status.phase == "Running" and status.run_id and not starting:
        uri = run_uri(rt.settings, tr, status.attempt)
        seen = await executor.observe(tr.namespace, run_key(tr), status.attempt, status.run_id)
        fields["run"] = plan.RunView(seen.state, seen.message, seen.failed_step, seen.log_tail)
        store = RunStore(uri)
        fields["steps"] = await asyncio.to_thread(store.steps)
        fields["artifacts"] = await asyncio.to_thread(store.artifacts)
        if seen.state in ("Succeeded", "Failed"):
            fields["evaluation"] = await asyncio.to_thread(store.read_json, EVALUATION_FILE)
            fields["manifest"] = await asyncio.to_thread(store.exists, MANIFEST_FILE)
        if seen.state == "Succeeded":  # only a finished run can have registered anything
            fields["registered"] = await find_registered(rt.kube, tr, status.attempt)
    return plan.Observed(**fields), executor


def _submission(
    rt: Runtime, tr: TrainingRun, status: TrainingRunStatus, ir_yaml: str
) -> Submission:
    uri = run_uri(rt.settings, tr, status.attempt)
    return Submission(
        namespace=tr.namespace,
        name=run_key(tr),
        attempt=status.attempt,
        ir_yaml=ir_yaml,
        spec_hash=status.spec_hash,
        run_uri=uri,
        arguments={"run_uri": uri},
        timeout_s=plan.timeout_seconds(tr.spec),
    )


async def reconcile_training(rt: Runtime, tr: TrainingRun, state: RunState, logger: Any) -> float:
    """One pass; returns the seconds until the next one is due."""
    async with rt.lock("gpu-budget", tr.namespace):
        decided: TrainingRunStatus | None = None
        try:
            observed, executor = await observe(rt, tr, state)
            decision = plan.plan_training(tr.spec, tr.status, observed)
            new = decided = decision.status
            if decision.cancel_run_id:
                await executor.cancel(
                    tr.namespace, run_key(tr), decision.cancel_attempt, decision.cancel_run_id
                )
            if decision.submit:
                assert state.compiled is not None
                submission = _submission(rt, tr, new, state.compiled.ir_yaml)
                new.run_id = await executor.submit(submission)
            if decision.register:
                uri = run_uri(rt.settings, tr, new.attempt)
                registered = await register(rt, tr, uri, new.run_id)
                again = plan.plan_training(
                    tr.spec,
                    new,
                    replace(observed, registered=registered, generation=new.observed_generation),
                )
                decision.events += again.events
                decision.status, new = again.status, again.status
        except ExecutorError as exc:
            # Refused for good: the attempt fails with the executor's words. Unavailable: say
            # so in Ready, keep the phase, and let the daemon retry with backoff.
            base = tr.status if exc.temporary or decided is None else decided
            status, events_ = plan.executor_error(
                base,
                generation=tr.metadata.generation,
                now=dt.datetime.now(dt.UTC),
                message=exc.message,
                temporary=exc.temporary,
            )
            await _write(rt, tr, status, events_, logger)
            if exc.temporary:
                raise
            return plan.IDLE_S
        await _write(rt, tr, new, decision.events, logger)
    return decision.requeue_after


async def _write(
    rt: Runtime,
    tr: TrainingRun,
    status: TrainingRunStatus,
    decided_events: list[tuple[str, str, str]],
    logger: Any,
) -> None:
    new = status.model_dump(by_alias=True, mode="json")
    if new != tr.status.model_dump(by_alias=True, mode="json"):
        await rt.kube.patch(
            TRAINING_RUNS, tr.namespace, tr.name, {"status": new}, subresource="status"
        )
        tr.status = status
    body = tr.model_dump(by_alias=True, mode="json")
    for type_, reason, message in decided_events:
        events.post(body, type_, reason, message)
        logger.info("%s: %s", reason, message.splitlines()[0] if message else "")


def _idle(tr: TrainingRun) -> bool:
    """Nothing to do until the spec changes or the schedule fires."""
    status = tr.status
    if status.attempt == 0 or status.observed_generation != tr.metadata.generation:
        return False
    if status.phase not in plan.TERMINAL:
        return False
    if tr.spec.schedule:
        due = plan.next_scheduled(tr.spec.schedule, status)
        return due is None or dt.datetime.now(dt.UTC) < due
    return True


@kopf.daemon(GROUP, VERSION, "trainingruns", cancellation_timeout=10)
async def run_training(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    rt = runtime(memo)
    state = RunState()
    failures = 0
    while not stopped:
        delay = 1.0
        try:
            tr = parse(TrainingRun, body)
            if state.status is not None and state.status.attempt >= tr.status.attempt:
                tr.status = state.status  # ours is newer than what the watch may have echoed
            if _idle(tr):
                await stopped.wait(1.0)
                continue
            with RECONCILE_SECONDS.labels("TrainingRun").time():
                delay = await reconcile_training(rt, tr, state, logger)
            state.status = tr.status
            failures = 0
            RECONCILES.labels("TrainingRun", "success").inc()
        except pydantic.ValidationError as exc:
            RECONCILES.labels("TrainingRun", "invalid").inc()
            logger.error("TrainingRun cannot be parsed: %s", exc)
            delay = 30.0
        except Exception as exc:
            failures += 1
            RECONCILES.labels("TrainingRun", "retry").inc()
            delay = min(2.0 * 2 ** min(failures, 5), 60.0)
            logger.warning("training pass failed (retry in %.0fs): %s", delay, exc)
            if failures == 3:
                events.post(
                    dict(body),
                    "Warning",
                    reasons.EXECUTOR_UNAVAILABLE,
                    f"{type(exc).__name__}: {exc}",
                )
        await stopped.wait(min(max(delay, 0.2), 2.0 if failures == 0 else delay))


@kopf.on.delete(GROUP, VERSION, "trainingruns")
async def delete_training(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Stop the current attempt's run; registered ModelVersions stay (the registry keeps them)."""
    rt = runtime(memo)
    tr = parse(TrainingRun, body)
    if tr.status.run_id and tr.status.phase in plan.ACTIVE:
        await executor_for(rt, tr).cancel(
            tr.namespace, run_key(tr), tr.status.attempt, tr.status.run_id
        )
