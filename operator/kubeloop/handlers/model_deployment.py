"""ModelDeployment: serve a ModelVersion; roll new versions out as a metric-gated canary.

One daemon per ModelDeployment, in the shape of every kubeloop daemon (``handlers/daemon.py``):
observe — the version the spec means (from the registry index), what the backend serves now,
the approve annotation and, when a step is due for judgement, the canary's measurements from
Prometheus — then ``planning.canary.plan_rollout`` decides once, the backend serves the decided
placement once, and the status is written once (then a used approve annotation is removed). A
restarted operator starts the daemon again and resumes from status; the backend re-attaches to
what it finds.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any, Literal

import kopf

from kubeloop import GROUP, VERSION, reasons
from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.api.model_version import ModelVersion
from kubeloop.backends.canary_metrics import Measured, measure
from kubeloop.backends.kube import MODEL_DEPLOYMENTS, TRAINING_RUNS, NotFound
from kubeloop.backends.registry import Registry
from kubeloop.contract.labels import APPROVE_ANNOTATION
from kubeloop.handlers import daemon, refusals
from kubeloop.handlers.errors import reconciler
from kubeloop.handlers.startup import Context, context
from kubeloop.planning import canary, spec_rules
from kubeloop.planning import registry as rules
from kubeloop.planning.placement import Placement, ServingState, build_placement


@dataclass(frozen=True)
class Observed:
    """What one pass looked at; nothing in it was changed by looking."""

    target: canary.Target
    versions: dict[str, ModelVersion]  # by name: the stable and the target version
    serving: ServingState
    measured: Measured | None
    approval: canary.Approval  # what the approve annotation says
    prediction_edges: tuple[float, ...] = ()  # shared by every version of the model


def placement(
    ctx: Context,
    md: ModelDeployment,
    versions: dict[str, ModelVersion],
    decided: tuple[str | None, str | None, int],
    edges: tuple[float, ...],
) -> Placement | None:
    """The placement to serve: the versions and the weight ``decided``, the request log under
    the tenant's prefix, the model's shared prediction edges (None: no stable version yet)."""
    return build_placement(
        versions, decided, request_log_uri=ctx.request_log_uri(md), prediction_edges=edges
    )


async def _run_registered(ctx: Context, md: ModelDeployment) -> str | None:
    """A TrainingRun source's ``status.modelVersion`` ('' none yet; None: no such run)."""
    ref = md.spec.model.training_run
    if ref is None:
        return ""
    try:
        run = await ctx.kube.get(TRAINING_RUNS, md.namespace, ref.name)
    except NotFound:
        return None
    return str((run.get("status") or {}).get("modelVersion") or "")


async def observe(
    ctx: Context, registry: Registry, md: ModelDeployment, now: dt.datetime
) -> Observed:
    status, versions = md.status, registry.versions(md.namespace)
    resolved = rules.resolve_source(
        md.spec.model, versions, run_registered=await _run_registered(ctx, md)
    )
    stable = registry.get(md.namespace, status.stable.model_version or "")
    why = rules.incompatible(stable, resolved.version)
    refused = refusals.model_deployment(md)
    if refused:  # what the webhook refuses, checked again: no new version rolls out
        target = canary.Target(None, spec_rules.message(refused), refused[0].reason)
    elif resolved.version is None:
        target = canary.Target(None, resolved.problem, resolved.reason)
    elif why:
        target = canary.Target(None, why, reasons.INCOMPATIBLE_SIGNATURE)
    else:
        target = canary.Target(resolved.version.name)
    known = {v.name: v for v in (stable, resolved.version) if v is not None}
    if status.canary.model_version and status.canary.model_version not in known:
        serving_canary = registry.get(md.namespace, status.canary.model_version)
        if serving_canary is not None:
            known[serving_canary.name] = serving_canary
    model = next(iter(known.values())).spec.model_name if known else ""
    edges = rules.shared_prediction_edges(versions, model)
    current = placement(
        ctx,
        md,
        known,
        (status.stable.model_version or target.version, status.canary.model_version,
         status.canary.weight),
        edges,
    )  # fmt: skip
    backend = ctx.serving_backend(md.spec.serving.backend)
    seen = ServingState(False, False)
    if current is not None:
        seen = await backend.observe(md, current)
    measured = None
    due = canary.analysis_due(
        md.spec, status, target.version, canary_ready=seen.canary_ready, now=now
    )
    if due and status.stable.model_version and status.canary.model_version:
        measured = await measure(
            ctx.prometheus,
            md,
            stable=status.stable.model_version,
            candidate=status.canary.model_version,
            now=now,
            task=_shared_task(known, status.stable.model_version, status.canary.model_version),
        )
    approval = canary.Approval(
        md.name, md.namespace, md.metadata.annotations.get(APPROVE_ANNOTATION)
    )
    return Observed(target, known, seen, measured, approval, edges)


def _shared_task(
    versions: dict[str, ModelVersion], stable: str, candidate: str
) -> Literal["classification", "regression"] | None:
    """The task both versions predict (None: unknown, or they differ and cannot compare)."""
    tasks = {v.spec.task for name, v in versions.items() if name in (stable, candidate)}
    return tasks.pop() if len(tasks) == 1 and stable in versions and candidate in versions else None


async def reconcile_deployment(
    ctx: Context, registry: Registry, md: ModelDeployment, logger: Any
) -> float:
    """One pass; returns the seconds until the next one is due."""
    now = dt.datetime.now(dt.UTC)
    seen = await observe(ctx, registry, md, now)
    decision = canary.plan_rollout(
        md.spec,
        md.status,
        seen.target,
        generation=md.metadata.generation,
        stable_ready=seen.serving.stable_ready,
        canary_ready=seen.serving.canary_ready,
        measurements=seen.measured.values if seen.measured else None,
        now=now,
        approval=seen.approval,
    )
    status = decision.status
    decided = (decision.stable, decision.canary, decision.weight)
    wanted = placement(ctx, md, seen.versions, decided, seen.prediction_edges)
    problem = ""
    if wanted is not None:
        try:
            served = await ctx.serving_backend(md.spec.serving.backend).apply(md, wanted)
        except Exception as exc:  # reported as Degraded; the next pass tries again
            problem = f"{type(exc).__name__}: {exc}"
        else:
            status.url = served.url
            settled = served.stable_ready and (served.canary_ready or decision.canary is None)
            problem = "" if settled else served.message
    if problem:
        status.conditions = canary.degrade(
            status, reasons.SERVING_FAILED, problem, md.metadata.generation, now
        )
    warnings = seen.measured.warnings if seen.measured else []
    await daemon.write_status(
        ctx.kube,
        MODEL_DEPLOYMENTS,
        md,
        status,
        [*[("Warning", r, m) for r, m in warnings], *decision.events],
    )
    if decision.promoted:
        alias = md.spec.rollout.promote_alias or ctx.settings.promote_alias
        await registry.claim_alias(md.namespace, decision.promoted, alias)
    if decision.reset_manual_action and md.spec.manual_action != "none":
        await ctx.kube.patch(
            MODEL_DEPLOYMENTS, md.namespace, md.name, {"spec": {"manualAction": "none"}}
        )
    if decision.clear_approval:  # after the status records the approval
        await ctx.kube.patch(
            MODEL_DEPLOYMENTS,
            md.namespace,
            md.name,
            {"metadata": {"annotations": {APPROVE_ANNOTATION: None}}},
        )
    for _type, reason, message in decision.events:
        logger.info("%s: %s", reason, message)
    return decision.requeue_after


@kopf.daemon(GROUP, VERSION, "modeldeployments", cancellation_timeout=10)
async def run_rollout(
    body: kopf.Body,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    ctx = context(memo)
    registry = ctx.registry(kwargs["versions_by_model"])  # the kopf index
    parse = functools.partial(ModelDeployment.parse, body)
    reconcile = daemon.own_status(parse, lambda md: reconcile_deployment(ctx, registry, md, logger))

    async def one_pass() -> float:
        if await daemon.refused(ctx.kube, MODEL_DEPLOYMENTS, body, parse, ""):
            return daemon.POLL_S
        return await reconcile()

    await daemon.run(
        "ModelDeployment",
        body,
        stopped,
        logger,
        one_pass,
        kube=ctx.kube,
        resource=MODEL_DEPLOYMENTS,
    )


@kopf.on.delete(GROUP, VERSION, "modeldeployments")
@reconciler("ModelDeployment")
async def delete_deployment(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    ctx = context(memo)
    md = ModelDeployment.parse(body)
    await ctx.serving_backend(md.spec.serving.backend).delete(md)
