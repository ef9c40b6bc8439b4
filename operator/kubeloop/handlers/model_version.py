"""ModelVersion: the registry. Verifies the artifact, enforces one holder per alias per
model, keeps the per-model index ConfigMap, becomes Ready."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from typing import Any

import kopf

from kubeloop import GROUP, VERSION, reasons
from kubeloop.api.model_version import ModelVersion
from kubeloop.backends import artifacts
from kubeloop.backends.kube import MODEL_VERSIONS, Conflict, KubeClient
from kubeloop.backends.registry import ModelKey, index_versions
from kubeloop.handlers import events, refusals
from kubeloop.handlers.errors import reconciler
from kubeloop.handlers.startup import Context, context
from kubeloop.planning import model_version as plan
from kubeloop.planning import spec_rules
from kubeloop.planning.model_version import VersionEntry

Index = kopf.Index[ModelKey, ModelVersion]


@kopf.index(GROUP, VERSION, "modelversions")
async def versions_by_model(body: kopf.Body, **_: Any) -> dict[ModelKey, ModelVersion]:
    """Every version of every model, kept current from the watch stream (no LIST calls);
    the other kinds read the registry through it (``backends/registry.py``). Async so that
    kopf calls it on the event loop: a plain function goes through a thread pool for every
    watch event, and the hand-offs cost more than the parse."""
    return index_versions(body)


async def _take_aliases(
    kube: KubeClient, namespace: str, holder: VersionEntry, lost: Sequence[str]
) -> None:
    """Remove ``lost`` aliases from another version's spec, guarded by its resourceVersion
    (if it changed meanwhile this is a 409 and the whole reconcile retries)."""
    keep = [a for a in holder.aliases if a not in lost]
    await kube.patch(
        MODEL_VERSIONS,
        namespace,
        holder.name,
        {
            "metadata": {"resourceVersion": holder.resource_version},
            "spec": {"aliases": keep},
        },
    )


async def _fresh_siblings(kube: KubeClient, namespace: str, model: str) -> list[VersionEntry]:
    items = await kube.request(
        "GET", MODEL_VERSIONS.path(namespace), params={"fieldSelector": f"spec.modelName={model}"}
    )
    return [VersionEntry.from_body(item) for item in items.get("items", [])]


async def _claim_aliases(
    ctx: Context, mv: ModelVersion, index: Index, attempts: int = 5
) -> tuple[ModelVersion, list[str]]:
    """Take the aliases ``mv`` claims from their previous holders.

    Alias moves are decided one at a time per model, on a fresh read of the claimant: its own
    claim may have been revoked by a reconcile that ran while this one queued. A holder that
    changed meanwhile answers 409; like client-go's RetryOnConflict, retry at once against
    fresh reads instead of failing the handler. Returns the fresh claimant and Event messages.
    """
    key = (mv.namespace, mv.spec.model_name)
    siblings = [VersionEntry.from_version(v) for v in index.get(key, [])]
    async with ctx.lock(*key):
        for _ in range(attempts):
            mv = ModelVersion.parse(await ctx.kube.get(MODEL_VERSIONS, mv.namespace, mv.name))
            holders = {e.name: e for e in siblings}
            messages = []
            try:
                for name, lost in plan.alias_removals(mv, siblings).items():
                    await _take_aliases(ctx.kube, mv.namespace, holders[name], lost)
                    messages.append(
                        f"{', '.join(lost)} of {mv.spec.model_name} moved from {name} to {mv.name}"
                    )
                return mv, messages
            except Conflict:
                siblings = await _fresh_siblings(ctx.kube, *key)
    raise kopf.TemporaryError(f"aliases of {mv.spec.model_name} kept changing", delay=1)


@kopf.on.resume(GROUP, VERSION, "modelversions")
@kopf.on.create(GROUP, VERSION, "modelversions")
@kopf.on.update(GROUP, VERSION, "modelversions")
@reconciler("ModelVersion")
async def reconcile_model_version(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    versions_by_model: Index,
    **_: Any,
) -> None:
    mv = ModelVersion.parse(body)
    shown = mv.status.model_dump(by_alias=True, mode="json")
    ctx = context(memo)
    ns = mv.namespace
    # Symlinks are looked up on the filesystem (off the loop); other URIs are judged as text.
    local = mv.spec.artifact.uri.startswith("file:")
    refused = (
        await asyncio.to_thread(refusals.model_version, ctx, mv)
        if local
        else refusals.model_version(ctx, mv)
    )
    policy = (
        plan.Problem(refused[0].reason, spec_rules.message(refused), retry=False)
        if refused
        else None
    )
    observed = plan.ArtifactObservation()
    if policy is None:
        observed = await artifacts.observe(
            mv.spec.artifact.uri, ns, ctx.kube, verify_local=ctx.settings.verify_local_artifacts
        )
    moved: list[str] = []
    if mv.spec.aliases and policy is None and plan.identity_problem(mv) is None:
        mv, moved = await _claim_aliases(ctx, mv, versions_by_model)
    result = plan.plan_model_version(
        mv, policy=policy, artifact=observed, now=dt.datetime.now(dt.UTC)
    )
    if result.problem is None:
        result.events += [("Normal", reasons.ALIAS_MOVED, m) for m in moved]
    ctx.index_writer.schedule(ns, mv.spec.model_name, versions_by_model)

    # Only what changed: a resumed version that is already right patches nothing (kopf then
    # writes nothing at all), so a restart costs no write per version.
    decided = result.status.model_dump(by_alias=True, mode="json")
    patch.status.update({k: v for k, v in decided.items() if shown.get(k) != v})
    for type_, reason, message in result.events:
        events.post(body, type_, reason, message)
    if result.problem is not None:
        if result.problem.retry:
            raise kopf.TemporaryError(result.problem.message, delay=15)
        raise kopf.PermanentError(result.problem.message)


@kopf.on.event(GROUP, VERSION, "modelversions", when=lambda type, **_: type == "DELETED")
async def forget_model_version(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """Drop a deleted version from its model's index (no finalizer needed: the index is
    derived state and garbage collection removes it with the last version)."""
    ctx = context(memo)
    namespace, model = body["metadata"]["namespace"], body["spec"]["modelName"]
    ctx.index_writer.schedule(namespace, model, kwargs["versions_by_model"])
