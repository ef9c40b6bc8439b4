"""DriftPolicy: evaluate drift signals of a served model; a breach that holds retrains it.

One daemon per DriftPolicy, in the shape of every kubeloop daemon (``handlers/daemon.py``):
observe — the target deployment and its stable version's reference (the registry index), the
retraining TrainingRuns the policy created (by label), and, when an evaluation is due, the
window from Prometheus, evaluated off the event loop — then ``planning.drift_policy.plan``
decides once, the retrain (if any) is created once, and the status is written once. The
child's name is deterministic, so a restarted operator adopts what it created before.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
from typing import Any

import kopf

from kubeloop import GROUP, VERSION, reasons
from kubeloop.api.drift_policy import DriftPolicy
from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.backends.drift_window import InvalidSignal, read_window, signal_queries
from kubeloop.backends.kube import (
    DRIFT_POLICIES,
    MODEL_DEPLOYMENTS,
    TRAINING_RUNS,
    Conflict,
    NotFound,
)
from kubeloop.backends.registry import Registry
from kubeloop.contract.labels import DRIFT_POLICY_LABEL
from kubeloop.handlers import daemon, errors, refusals
from kubeloop.handlers.metrics import DRIFT_FIRING, DRIFT_SIGNAL, DRIFT_THRESHOLD, RETRAINS
from kubeloop.handlers.startup import Context, context
from kubeloop.planning import drift_policy as plan
from kubeloop.planning import drift_signals, retrain, spec_rules


def served_view(ctx: Context, md: ModelDeployment) -> retrain.Served:
    logged = md.spec.serving.monitoring.request_log.enabled
    return retrain.Served(
        stable=md.status.stable.model_version,
        rollouts={r.to_version: r.result for r in md.status.history},
        followed_alias=md.spec.model.alias.alias if md.spec.model.alias else None,
        request_log_uri=ctx.request_log_uri(md) if logged else "",
    )


def child_of(body: dict[str, Any]) -> retrain.Child:
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    gates: dict[str, Any] = next(
        (c for c in conditions if c.get("type") == reasons.GATES_PASSED), {}
    )
    ready: dict[str, Any] = next((c for c in conditions if c.get("type") == reasons.READY), {})
    return retrain.Child(
        name=body["metadata"]["name"],
        phase=str(status.get("phase") or ""),
        model_version=str(status.get("modelVersion") or ""),
        gates_failed=gates.get("status") == "False",
        message=str(ready.get("message") or "")[:300],
    )


async def observe(
    ctx: Context, registry: Registry, policy: DriftPolicy, now: dt.datetime
) -> plan.Observed:
    ns, spec = policy.namespace, policy.spec
    try:
        md = ModelDeployment.parse(await ctx.kube.get(MODEL_DEPLOYMENTS, ns, spec.target.name))
    except NotFound:
        return plan.Observed(
            now,
            problem=(
                reasons.TARGET_NOT_FOUND,
                f"spec.target.name={spec.target.name}: no ModelDeployment of that name in "
                f"namespace {ns}",
            ),
        )
    served = served_view(ctx, md)
    children = {
        b["metadata"]["name"]: child_of(b)
        for b in await ctx.kube.list(
            TRAINING_RUNS, ns, label_selector=f"{DRIFT_POLICY_LABEL}={policy.name}"
        )
    }
    base = plan.Observed(now, served=served, children=children)
    if not served.stable:
        return _with_problem(
            base,
            reasons.NOT_SERVING,
            f"spec.target.name={spec.target.name} serves no stable version yet",
        )
    mv = registry.get(ns, served.stable)
    if mv is None:
        return _with_problem(
            base,
            reasons.MODEL_VERSION_NOT_FOUND,
            f"the stable version {served.stable} of {spec.target.name} is not in the registry",
        )
    baseline = drift_signals.Baseline.of(mv)
    wrong = drift_signals.problems(spec.signals, baseline)
    if wrong:
        reason = wrong[0][0] if len({r for r, _ in wrong}) == 1 else reasons.INVALID_SPEC
        return _with_problem(base, reason, "; ".join(m for _, m in wrong))
    try:
        queries = signal_queries(spec.signals, ns, md.name, served.stable, spec.window)
    except InvalidSignal as exc:
        return _with_problem(base, reasons.INVALID_SPEC, str(exc))
    results, unavailable = None, ""
    if plan.evaluation_due(policy, now):
        window = await read_window(ctx.prometheus, spec.signals, baseline, queries)
        unavailable = window.problem
        # Calibrating an auto threshold at a new sample size simulates: off the event loop.
        results = await asyncio.to_thread(drift_signals.evaluate, spec.signals, baseline, window)
    template, template_problem = None, ""
    if results is not None and spec.action.mode == "retrain":
        template, template_problem = await _template(ctx, policy, mv.spec.lineage)
    return plan.Observed(
        now,
        served=served,
        results=results,
        children=children,
        template=template,
        template_problem=template_problem,
        unavailable=unavailable,
    )


def _with_problem(base: plan.Observed, reason: str, message: str) -> plan.Observed:
    return plan.Observed(
        base.now, served=base.served, problem=(reason, message), children=base.children
    )


async def _template(
    ctx: Context, policy: DriftPolicy, lineage: Any
) -> tuple[dict[str, Any] | None, str]:
    ref = policy.spec.action.template
    if ref is not None:
        name, field = ref.name, f"spec.action.template.name={ref.name}"
    elif lineage is not None and lineage.training_run:
        name = lineage.training_run
        field = f"the served version's lineage.trainingRun={name} (spec.action.template unset)"
    else:
        return None, (
            "spec.action.template is unset and the served version names no TrainingRun in its "
            "lineage: set spec.action.template"
        )
    try:
        body = await ctx.kube.get(TRAINING_RUNS, policy.namespace, name)
    except NotFound:
        return None, f"{field}: no TrainingRun of that name in namespace {policy.namespace}"
    return dict(body.get("spec") or {}), ""


async def reconcile_policy(
    ctx: Context, registry: Registry, policy: DriftPolicy, logger: Any
) -> float:
    now = dt.datetime.now(dt.UTC)
    seen = await observe(ctx, registry, policy, now)
    decision = plan.plan(policy, seen)
    if decision.create is not None:
        await _create_retrain(ctx, policy, decision.create)
        RETRAINS.labels(policy.namespace, policy.name).inc()
    _export(policy, decision)
    await daemon.write_status(ctx.kube, DRIFT_POLICIES, policy, decision.status, decision.events)
    for _type, reason, message in decision.events:
        logger.info("%s: %s", reason, message)
    return decision.requeue_after


async def _create_retrain(ctx: Context, policy: DriftPolicy, body: dict[str, Any]) -> None:
    """Create the retrain. A 409 is adopted only when the object of that name exists and is
    this policy's (created by a pass before a restart). Any other 409 — a refused write, or
    the name taken by something else — fails the pass, which retries with backoff: recording
    a refused create as started would find the retrain "gone" later and retrain the same
    breach again."""
    name = body["metadata"]["name"]
    try:
        await ctx.kube.create(TRAINING_RUNS, policy.namespace, body)
    except Conflict as refused:
        try:
            existing = await ctx.kube.get(TRAINING_RUNS, policy.namespace, name)
        except NotFound:
            raise refused from None  # the 409 refused the create itself: nothing to adopt
        labels = existing.get("metadata", {}).get("labels") or {}
        if labels.get(DRIFT_POLICY_LABEL) != policy.name:
            raise errors.InvalidSpec(
                "spec.action",
                f"the retrain's name {name} is taken by a TrainingRun this policy did not create",
            ) from None


def _export(policy: DriftPolicy, decision: plan.Decision) -> None:
    ns, name = policy.namespace, policy.name
    DRIFT_FIRING.labels(ns, name).set(1.0 if decision.firing else 0.0)
    # The retrain counter exists at 0 from the first pass, so increase() sees the first retrain.
    RETRAINS.labels(ns, name)
    for s in decision.status.signals:
        if s.value is not None and s.outcome != "Inconclusive":
            DRIFT_SIGNAL.labels(ns, name, s.name).set(s.value)
        else:
            with contextlib.suppress(KeyError):  # absent while inconclusive
                DRIFT_SIGNAL.remove(ns, name, s.name)
        if s.threshold is not None:
            DRIFT_THRESHOLD.labels(ns, name, s.name).set(s.threshold)


@kopf.daemon(GROUP, VERSION, "driftpolicies", cancellation_timeout=10)
async def run_policy(
    body: kopf.Body,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    ctx = context(memo)
    registry = ctx.registry(kwargs["versions_by_model"])  # the kopf index
    reconcile = daemon.own_status(
        lambda: DriftPolicy.parse(body), lambda p: reconcile_policy(ctx, registry, p, logger)
    )

    async def one_pass() -> float:
        parse = functools.partial(DriftPolicy.parse, body)
        if await daemon.refused(ctx.kube, DRIFT_POLICIES, body, parse, "Failed"):
            return daemon.POLL_S
        found = await refusals.drift_policy(ctx, parse(), served=False)
        if found:
            reason, message = found[0].reason, spec_rules.message(found)
            await daemon.refuse(ctx.kube, DRIFT_POLICIES, body, reason, message, phase="Failed")
            return daemon.POLL_S
        return await reconcile()

    await daemon.run(
        "DriftPolicy", body, stopped, logger, one_pass, kube=ctx.kube, resource=DRIFT_POLICIES
    )
