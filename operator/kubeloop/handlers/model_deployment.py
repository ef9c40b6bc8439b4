"""ModelDeployment: serve a ModelVersion; roll new versions out as a metric-gated canary.

One kopf daemon per ModelDeployment drives the rollout: every pass it resolves the version the
spec asks for, makes the backend serve the current placement, lets ``planning.canary`` decide
(measuring through Prometheus when an analysis is due) and writes status once. It is the only
writer of the status, and it keeps the status it wrote itself rather than waiting for the
watch to echo it back. A restarted operator starts the daemon again and resumes from status.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from typing import Any

import kopf

from kubeloop import GROUP, VERSION, reasons
from kubeloop.api.model_deployment import ModelDeployment, ModelDeploymentStatus
from kubeloop.api.model_version import ModelVersion
from kubeloop.backends.kube import MODEL_DEPLOYMENTS, MODEL_VERSIONS, TRAINING_RUNS, NotFound
from kubeloop.backends.serving import Placement, Served, ServingBackend
from kubeloop.handlers import events
from kubeloop.handlers.analysis import measure
from kubeloop.handlers.errors import parse, reconciler
from kubeloop.handlers.runtime import RECONCILE_SECONDS, RECONCILES, Runtime, runtime
from kubeloop.planning import canary

log = logging.getLogger("kubeloop.deployments")


def backend_for(rt: Runtime, md: ModelDeployment) -> ServingBackend:
    name = md.spec.serving.backend
    if name == "default":
        name = rt.settings.serving_backend
    return rt.serving[name]


async def _get_version(rt: Runtime, namespace: str, name: str) -> ModelVersion | None:
    try:
        return parse(ModelVersion, await rt.kube.get(MODEL_VERSIONS, namespace, name))
    except NotFound:
        return None


async def resolve_target(
    rt: Runtime, md: ModelDeployment
) -> tuple[canary.Target, ModelVersion | None]:
    """The ModelVersion the spec asks for: by name, by alias, or a TrainingRun's latest."""
    ns, source = md.namespace, md.spec.model
    name: str | None = None
    if source.model_version is not None:
        name = source.model_version.name
    elif source.training_run is not None:
        try:
            run = await rt.kube.get(TRAINING_RUNS, ns, source.training_run.name)
        except NotFound:
            return canary.Target(
                None,
                f"spec.model.trainingRun {source.training_run.name!r} not found",
                reasons.MODEL_VERSION_NOT_FOUND,
            ), None
        name = (run.get("status") or {}).get("modelVersion")
        if not name:
            return canary.Target(
                None,
                f"TrainingRun {source.training_run.name!r} has not registered a model yet",
                reasons.MODEL_VERSION_NOT_FOUND,
            ), None
    elif source.alias is not None:
        name = await _alias_holder(rt, ns, source.alias.model_name, source.alias.alias)
        if name is None:
            return canary.Target(
                None,
                f"no ModelVersion of {source.alias.model_name!r} holds "
                f"alias {source.alias.alias!r}",
                reasons.MODEL_VERSION_NOT_FOUND,
            ), None
    assert name is not None
    mv = await _get_version(rt, ns, name)
    if mv is None:
        return canary.Target(
            None, f"ModelVersion {name!r} not found", reasons.MODEL_VERSION_NOT_FOUND
        ), None
    if mv.status.phase != "Ready":
        return canary.Target(
            None,
            f"ModelVersion {name!r} is not Ready ({mv.status.phase})",
            reasons.MODEL_VERSION_NOT_READY,
        ), None
    return canary.Target(name), mv


async def _alias_holder(rt: Runtime, namespace: str, model: str, alias: str) -> str | None:
    items = (
        await rt.kube.request(
            "GET",
            MODEL_VERSIONS.path(namespace),
            params={"fieldSelector": f"spec.modelName={model}"},
        )
    )["items"]
    ready = [ModelVersion.model_validate(i) for i in items]
    ready = [v for v in ready if v.status.phase == "Ready"]
    holders = [v for v in ready if alias in v.status.aliases]
    if holders:
        return holders[0].name
    if alias == "latest" and ready:  # nobody claims latest: the highest version is
        return max(ready, key=lambda v: v.spec.version).name
    return None


def incompatible(stable: ModelVersion | None, target: ModelVersion | None) -> str:
    """Why ``target`` cannot replace ``stable`` behind the same endpoint ('' if it can)."""
    if stable is None or target is None or stable.name == target.name:
        return ""
    before, after = stable.spec.signature, target.spec.signature
    if before is None or after is None or not before.inputs or not after.inputs:
        return ""
    names_before = [(i.name, i.dtype) for i in before.inputs]
    names_after = [(i.name, i.dtype) for i in after.inputs]
    if names_before != names_after:
        return (
            f"{target.name}'s input signature ({len(names_after)} inputs) differs from "
            f"{stable.name}'s ({len(names_before)} inputs): requests would break"
        )
    return ""


def _served(mv: ModelVersion) -> Served:
    return Served(mv.name, mv.spec.artifact.uri, mv.spec.artifact.format)


async def reconcile_once(rt: Runtime, md: ModelDeployment, logger: Any) -> float:
    """One pass; returns the seconds until the next one is due."""
    status = md.status
    now = dt.datetime.now(dt.UTC)
    target, target_mv = await resolve_target(rt, md)
    stable_mv = (
        await _get_version(rt, md.namespace, status.stable.model_version)
        if status.stable.model_version
        else None
    )
    why = incompatible(stable_mv, target_mv)
    if why:
        target = canary.Target(None, why, reasons.INCOMPATIBLE_SIGNATURE)
    backend = backend_for(rt, md)
    versions = {v.name: v for v in (stable_mv, target_mv) if v is not None}

    async def serve(
        decision_stable: str | None, decision_canary: str | None, weight: int
    ) -> tuple[bool, bool, str, str]:
        if decision_stable is None or decision_stable not in versions:
            return False, False, "", ""
        placement = Placement(
            _served(versions[decision_stable]),
            _served(versions[decision_canary]) if decision_canary in versions else None,
            weight,
        )
        try:
            state = await backend.apply(md, placement)
        except Exception as exc:
            return False, False, "", f"{type(exc).__name__}: {exc}"
        # Still loading is not a failure (readiness is in Ready/Progressing); a crash is.
        settled = state.stable_ready and (state.canary_ready or decision_canary is None)
        return state.stable_ready, state.canary_ready, state.url, "" if settled else state.message

    current = await serve(
        status.stable.model_version or target.version,
        status.canary.model_version,
        status.canary.weight,
    )
    stable_ready, canary_ready, url, problem = current
    plan = functools.partial(
        canary.plan_rollout,
        md.spec,
        status,
        target,
        generation=md.metadata.generation,
        stable_ready=stable_ready,
        canary_ready=canary_ready,
        now=now,
    )
    decision = plan(measurements=None)
    if decision.analyse and decision.canary and decision.stable:
        measured = await measure(rt, md, stable=decision.stable, candidate=decision.canary)
        for warning in measured.warnings:
            events.post(md.model_dump(by_alias=True), "Warning", warning[0], warning[1])
        decision = plan(measurements=measured.values)
    if (decision.stable, decision.canary, decision.weight) != (
        status.stable.model_version,
        status.canary.model_version,
        status.canary.weight,
    ):
        # Apply the new placement now: a rollback takes traffic away within this pass.
        stable_ready, canary_ready, url, problem = await serve(
            decision.stable, decision.canary, decision.weight
        )
    new_status = decision.status
    new_status.url = url
    if problem:
        new_status.conditions = canary.degrade(
            new_status, reasons.SERVING_FAILED, problem, md.metadata.generation, now
        )
    await _write(rt, md, new_status, decision, logger)
    return decision.requeue_after


async def _write(
    rt: Runtime,
    md: ModelDeployment,
    status: ModelDeploymentStatus,
    decision: canary.Decision,
    logger: Any,
) -> None:
    body = md.model_dump(by_alias=True, mode="json")
    new = status.model_dump(by_alias=True, mode="json")
    if new != md.status.model_dump(by_alias=True, mode="json"):
        await rt.kube.patch(
            MODEL_DEPLOYMENTS, md.namespace, md.name, {"status": new}, subresource="status"
        )
        md.status = status
    for type_, reason, message in decision.events:
        events.post(body, type_, reason, message)
        logger.info("%s: %s", reason, message)
    if decision.promoted:
        # Promotion moves the `production` alias; the registry takes it from the old holder.
        mv = await _get_version(rt, md.namespace, decision.promoted)
        if mv is not None and "production" not in mv.spec.aliases:
            await rt.kube.patch(
                MODEL_VERSIONS,
                md.namespace,
                mv.name,
                {"spec": {"aliases": [*mv.spec.aliases, "production"]}},
            )
    if decision.reset_manual_action and md.spec.manual_action != "none":
        await rt.kube.patch(
            MODEL_DEPLOYMENTS, md.namespace, md.name, {"spec": {"manualAction": "none"}}
        )


@kopf.daemon(GROUP, VERSION, "modeldeployments", cancellation_timeout=10)
async def run_rollout(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    rt = runtime(memo)
    status: ModelDeploymentStatus | None = None  # what this daemon last wrote
    while not stopped:
        started = RECONCILE_SECONDS.labels("ModelDeployment").time()
        delay = 1.0
        try:
            md = parse(ModelDeployment, body)
            if status is not None:
                md.status = status  # ours is newer than what the watch may have echoed yet
            with started:
                delay = await reconcile_once(rt, md, logger)
            status = md.status
            RECONCILES.labels("ModelDeployment", "success").inc()
        except Exception as exc:
            RECONCILES.labels("ModelDeployment", "retry").inc()
            logger.warning("rollout pass failed, retrying: %s", exc)
            delay = 2.0
        await stopped.wait(min(max(delay, 0.2), 2.0))


@kopf.on.delete(GROUP, VERSION, "modeldeployments")
@reconciler("ModelDeployment")
async def delete_deployment(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime(memo)
    md = parse(ModelDeployment, body)
    await backend_for(rt, md).delete(md)
