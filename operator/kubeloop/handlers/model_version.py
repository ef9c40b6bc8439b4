"""ModelVersion: the registry. Verifies the artifact, enforces one holder per alias per
model, keeps the per-model index ConfigMap, becomes Ready."""

from __future__ import annotations

import datetime as dt
from typing import Any

import kopf

from kubeloop import GROUP, VERSION, reasons
from kubeloop.api.model_version import ModelVersion
from kubeloop.backends import artifacts
from kubeloop.backends.kube import MODEL_VERSIONS, Conflict, Kind, KubeClient
from kubeloop.handlers import events
from kubeloop.handlers.errors import parse, reconciler
from kubeloop.handlers.runtime import Runtime, runtime
from kubeloop.planning import model_version as plan

CONFIGMAPS = Kind("", "v1", "configmaps")


async def _siblings(kube: KubeClient, namespace: str, model_name: str) -> list[ModelVersion]:
    items = await kube.request(
        "GET", MODEL_VERSIONS.path(namespace),
        params={"fieldSelector": f"spec.modelName={model_name}"})
    return [ModelVersion.model_validate(item) for item in items.get("items", [])]


async def _take_aliases(kube: KubeClient, holder: ModelVersion, lost: list[str]) -> None:
    """Remove ``lost`` aliases from another version's spec, guarded by its resourceVersion
    (a concurrent change makes this 409 and the whole reconcile retries)."""
    keep = [a for a in holder.spec.aliases if a not in lost]
    await kube.patch(MODEL_VERSIONS, holder.namespace, holder.name, {
        "metadata": {"resourceVersion": holder.metadata.resource_version},
        "spec": {"aliases": keep},
    })


async def _write_index(rt: Runtime, namespace: str, model_name: str,
                       versions: list[ModelVersion]) -> None:
    live = [v for v in versions if not v.metadata.deletion_timestamp]
    if not live:
        return  # garbage collection removes the index with its last owner
    await rt.kube.apply(CONFIGMAPS, namespace,
                        plan.build_registry_index(model_name, namespace, live))


@kopf.on.resume(GROUP, VERSION, "modelversions")
@kopf.on.create(GROUP, VERSION, "modelversions")
@kopf.on.update(GROUP, VERSION, "modelversions")
@reconciler("ModelVersion")
async def reconcile_model_version(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
                                  **_: Any) -> None:
    seen = parse(ModelVersion, body)
    rt = runtime(memo)
    ns, model_name = seen.namespace, seen.spec.model_name
    now = dt.datetime.now(dt.UTC)
    # One lock per registered model: alias moves and the index are decided on fresh objects
    # read under it, so concurrent claims serialise and exactly one holder remains.
    async with rt.lock(ns, model_name):
        siblings = await _siblings(rt.kube, ns, model_name)
        mv = next((s for s in siblings if s.name == seen.name), seen)
        policy = plan.artifact_policy_problem(
            mv.spec.artifact.uri, ns, artifact_root=str(rt.settings.artifact_root),
            object_store_prefix=rt.settings.object_store_prefix)
        observed = plan.ArtifactObservation()
        if policy is None:
            observed = await artifacts.observe(mv.spec.artifact.uri, ns, rt.kube,
                                               verify_local=rt.settings.verify_local_artifacts)
        duplicate = plan.duplicate_of(mv, siblings)
        result = plan.plan_model_version(mv, policy=policy, artifact=observed,
                                         duplicate=duplicate, now=now)
        if result.problem is None:
            removals = plan.alias_removals(mv, siblings)
            try:
                for name, lost in removals.items():
                    holder = next(s for s in siblings if s.name == name)
                    await _take_aliases(rt.kube, holder, lost)
                    message = (f"{', '.join(lost)} of {model_name} moved from {name} to "
                               f"{mv.name}")
                    result.events.append(("Normal", reasons.ALIAS_MOVED, message))
            except Conflict as exc:
                raise kopf.TemporaryError(f"alias holder changed meanwhile: {exc}",
                                          delay=0.5) from exc
            if removals:
                siblings = await _siblings(rt.kube, ns, model_name)
        await _write_index(rt, ns, model_name, siblings)

    patch.status.update(result.status.model_dump(by_alias=True, mode="json"))
    for type_, reason, message in result.events:
        events.post(body, type_, reason, message)
    if result.problem is not None:
        if result.problem.retry:
            raise kopf.TemporaryError(result.problem.message, delay=15)
        raise kopf.PermanentError(result.problem.message)


@kopf.on.delete(GROUP, VERSION, "modelversions")
@reconciler("ModelVersion")
async def release_model_version(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Drop the deleted version from its model's index (its aliases go with it)."""
    mv = parse(ModelVersion, body)
    rt = runtime(memo)
    async with rt.lock(mv.namespace, mv.spec.model_name):
        siblings = await _siblings(rt.kube, mv.namespace, mv.spec.model_name)
        await _write_index(rt, mv.namespace, mv.spec.model_name,
                           [s for s in siblings if s.name != mv.name])
