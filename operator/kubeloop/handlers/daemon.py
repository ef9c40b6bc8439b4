"""The one loop every kubeloop daemon runs.

A daemon (one per TrainingRun, one per ModelDeployment) is the only writer of its resource's
status. Each pass has one shape:

    observe (read-only: the resource, its children, the registry index, the backend, Prometheus)
    → plan once (a pure function of spec, observed world and clock: status, actions, events,
      when to look again)
    → apply once (the actions)
    → write status once, post the Events.

This module owns what is common to every pass: the pacing (a pass is due after the plan's
requeue, and at least every ``POLL_S`` because a daemon is not woken by spec changes), one
backoff policy for failures (``errors.backoff``), the error mapping (``errors.classify``), a
Warning Event once failures persist, and the reconcile metrics.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, TypeVar, get_args

import kopf
import pydantic
from pydantic import BaseModel

from kubeloop.api.base import Condition
from kubeloop.backends.kube import Kind, KubeClient
from kubeloop.handlers import errors, events, metrics
from kubeloop.planning.conditions import find, set_condition
from kubeloop.reasons import DEGRADED, INVALID_SPEC, READY, RECOVERED

POLL_S = 2.0  # the longest a daemon waits before it looks at its (live) body again
MIN_WAIT_S = 0.2
WARN_AFTER = 3  # consecutive failed passes before a Warning Event says so

Pass = Callable[[], Awaitable[float | None]]  # seconds until the next pass; None: idle


async def run(
    kind: str,
    body: Mapping[str, Any],
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    reconcile_pass: Pass,
    *,
    kube: KubeClient | None = None,
    resource: Kind | None = None,
) -> None:
    """Run ``reconcile_pass`` until the daemon is stopped; the resource's state series exist
    while it runs. With ``kube`` and ``resource``, failures that persist show on the resource
    as ``Degraded=True`` with their reason (``ApiUnavailable``, ``PrometheusUnavailable``,
    ``ExecutorUnavailable``, …) until a pass succeeds again."""
    failures = 0
    degraded = ""  # the message of the Degraded condition this loop set (empty: none)
    for result in ("success", *get_args(errors.Result)):  # at 0 before the first of each
        metrics.RECONCILES.labels(kind, result)
    metrics.DAEMONS.labels(kind).inc()
    try:
        while not stopped:
            try:
                with metrics.RECONCILE_SECONDS.labels(kind).time():
                    delay = await reconcile_pass()
                if delay is not None:
                    metrics.RECONCILES.labels(kind, "success").inc()
                failures = 0
                wait = min(max(delay if delay is not None else POLL_S, MIN_WAIT_S), POLL_S)
                if degraded and kube is not None and resource is not None:
                    await _clear_degraded(kube, resource, body, degraded)
                    degraded = ""
            except Exception as exc:
                failure = errors.classify(exc)
                metrics.RECONCILES.labels(kind, failure.result).inc()
                failures += 1
                # What will not heal by retrying waits for a spec change: look again now and then.
                retryable = failure.retryable
                wait = errors.backoff(failures - 1) if retryable else errors.INVALID_RECHECK_S
                if failure.result == "error":
                    logger.exception("%s pass failed (retry in %.0fs)", kind, wait)
                else:
                    logger.warning(
                        "%s pass failed (retry in %.0fs): %s", kind, wait, failure.message
                    )
                if failures == WARN_AFTER:
                    events.post(body, "Warning", failure.reason, failure.message)
                if failures >= WARN_AFTER and kube is not None and resource is not None:
                    with contextlib.suppress(Exception):  # the API may be what is down
                        degraded = await _mark_degraded(kube, resource, body, failure)
            metrics.export_state(kind, body)
            await stopped.wait(wait)
    finally:
        metrics.DAEMONS.labels(kind).dec()
        metrics.forget(kind, body)


async def _mark_degraded(
    kube: KubeClient, resource: Kind, body: Mapping[str, Any], failure: errors.Failure
) -> str:
    """Degraded=True with the failure's reason (written only when it changes); returns the
    message the condition now holds."""
    current = find(_conditions(body), DEGRADED)
    if current is None or (current.status, current.reason) != ("True", failure.reason):
        await _write_degraded(
            kube, resource, body, value="True", reason=failure.reason, message=failure.message
        )
        return failure.message
    return current.message


async def _clear_degraded(
    kube: KubeClient, resource: Kind, body: Mapping[str, Any], held: str
) -> None:
    """Degraded=False after a pass succeeded, if Degraded is still the one this loop set (the
    plan may hold it for its own reasons, which are not this loop's to clear)."""
    current = find(_conditions(body), DEGRADED)
    if current is not None and current.status == "True" and current.message == held:
        message = f"recovered from {current.reason}"
        await _write_degraded(
            kube, resource, body, value="False", reason=RECOVERED, message=message
        )


def _conditions(body: Mapping[str, Any]) -> list[Condition]:
    return [Condition.model_validate(c) for c in (body.get("status") or {}).get("conditions") or []]


async def _write_degraded(
    kube: KubeClient,
    resource: Kind,
    body: Mapping[str, Any],
    *,
    value: Literal["True", "False"],
    reason: str,
    message: str,
) -> None:
    meta = body["metadata"]
    conditions = set_condition(
        _conditions(body),
        DEGRADED,
        value,
        reason,
        message,
        generation=int(meta.get("generation") or 0),
        now=dt.datetime.now(dt.UTC),
    )
    dumped = [c.model_dump(by_alias=True, mode="json") for c in conditions]
    patch = {"status": {"conditions": dumped}}
    await kube.patch(resource, meta["namespace"], meta["name"], patch, subresource="status")


class Owner(Protocol):
    """A parsed resource whose status a daemon writes."""

    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...

    status: Any

    def model_dump(self, *, by_alias: bool, mode: str) -> dict[str, Any]: ...


OwnerT = TypeVar("OwnerT", bound=Owner)


def own_status(
    parse: Callable[[], OwnerT], reconcile: Callable[[OwnerT], Awaitable[float]]
) -> Callable[[], Awaitable[float]]:
    """A pass over a resource whose status this daemon alone writes: the resource is parsed from
    the live body, but carries the status this daemon last wrote (newer than what the watch may
    have echoed yet)."""
    written: list[Any] = []

    async def one_pass() -> float:
        resource = parse()
        if written:
            resource.status = written[-1]
        delay = await reconcile(resource)
        written[:] = [resource.status]
        return delay

    return one_pass


async def refuse(
    kube: KubeClient, kind: Kind, body: Mapping[str, Any], reason: str, message: str, *, phase: str
) -> None:
    """Ready=False naming the field, written once (a spec the API server let through: no
    webhook registered, or a rule the parse itself enforces); ``phase`` '' leaves it."""
    meta, status = body["metadata"], dict(body.get("status") or {})
    conditions = [Condition.model_validate(c) for c in status.get("conditions") or []]
    ready = find(conditions, READY)
    if ready is not None and (ready.status, ready.reason, ready.message) == (
        "False",
        reason,
        message,
    ):
        return
    generation = int(meta.get("generation") or 0)
    conditions = set_condition(
        conditions,
        READY,
        "False",
        reason,
        message,
        generation=generation,
        now=dt.datetime.now(dt.UTC),
    )
    patch: dict[str, Any] = {
        "conditions": [c.model_dump(by_alias=True, mode="json") for c in conditions],
        "observedGeneration": generation,
    }
    if phase:
        patch["phase"] = phase
    await kube.patch(kind, meta["namespace"], meta["name"], {"status": patch}, subresource="status")
    events.post(body, "Warning", reason, message)


async def refused(
    kube: KubeClient, kind: Kind, body: Mapping[str, Any], parse: Callable[[], Any], phase: str
) -> bool:
    """Whether the live body does not parse (and so was refused, with the parse's words)."""
    try:
        parse()
    except pydantic.ValidationError as exc:
        message = errors.describe_validation_error(exc)[1]
        await refuse(kube, kind, body, INVALID_SPEC, message, phase=phase)
        return True
    return False


async def write_status(
    kube: KubeClient,
    kind: Kind,
    resource: Owner,
    status: BaseModel,
    decided_events: list[tuple[str, str, str]],
) -> None:
    """Write ``status`` in one patch when it differs from what ``resource`` shows (and keep it
    on ``resource``), then post the decided Events."""
    new = status.model_dump(by_alias=True, mode="json")
    old = resource.status.model_dump(by_alias=True, mode="json")
    if new != old:
        await kube.patch(
            kind, resource.namespace, resource.name, {"status": new}, subresource="status"
        )
        resource.status = status
        metrics.count_transitions(
            type(resource).__name__, resource.namespace, resource.name, old, new
        )
    body = resource.model_dump(by_alias=True, mode="json")
    for type_, reason, message in decided_events:
        events.post(body, type_, reason, message)
