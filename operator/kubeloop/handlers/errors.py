"""One mapping from failures to what happens next, for every handler and daemon.

- API 404/409/429/5xx, connection errors, timeouts, an executor or Prometheus that is
  unavailable → retry with backoff (``kopf.TemporaryError`` in ``on.*`` handlers)
- a spec the models reject (pydantic), or ``InvalidSpec`` → Ready=False with the field named,
  a Warning Event, no retry (``kopf.PermanentError``)
- other API errors (403, 422, …), an executor that refuses → failed, no retry
- anything else → re-raised with its traceback (daemons log it and back off)
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import kopf
import pydantic

from kubeloop import reasons
from kubeloop.api.base import Condition
from kubeloop.backends.executor import ExecutorError
from kubeloop.backends.kube import ApiError
from kubeloop.backends.prometheus import PrometheusUnavailable
from kubeloop.handlers import events
from kubeloop.handlers.metrics import RECONCILE_SECONDS, RECONCILES
from kubeloop.planning.conditions import set_condition

Handler = Callable[..., Awaitable[Any]]
Result = Literal["invalid", "retry", "failed", "error"]
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 120.0
INVALID_RECHECK_S = 30.0  # a daemon whose spec cannot be parsed looks again this often


class InvalidSpec(Exception):
    """The spec is well-formed but cannot be acted on (e.g. a cross-namespace reference)."""

    def __init__(self, field: str, message: str, reason: str = reasons.INVALID_SPEC) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


def backoff(retry: int, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S) -> float:
    """Seconds before retry number ``retry`` (0 for the first): 2, 4, 8, … up to 120."""
    return float(min(cap, base * 2 ** max(retry, 0)))


@dataclass(frozen=True)
class Failure:
    """What a failure means: ``result`` for the metrics, a reason and message for humans."""

    result: Result
    reason: str
    message: str

    @property
    def retryable(self) -> bool:
        return self.result in ("retry", "error")


def describe_validation_error(error: pydantic.ValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return field, f"{field}: {first['msg']} (got {shown[:200]})"


def classify(exc: BaseException) -> Failure:
    """The one table of which errors retry and which do not."""
    if isinstance(exc, pydantic.ValidationError):
        return Failure("invalid", reasons.INVALID_SPEC, describe_validation_error(exc)[1])
    if isinstance(exc, InvalidSpec):
        return Failure("invalid", exc.reason, str(exc))
    if isinstance(exc, ApiError):
        return Failure("retry" if exc.retryable else "failed", reasons.API_UNAVAILABLE, str(exc))
    if isinstance(exc, TimeoutError | aiohttp.ClientError):
        return Failure("retry", reasons.API_UNAVAILABLE, f"API unreachable: {exc!r}")
    if isinstance(exc, ExecutorError):
        reason = reasons.EXECUTOR_UNAVAILABLE if exc.temporary else reasons.EXECUTOR_REJECTED
        return Failure("retry" if exc.temporary else "failed", reason, exc.message)
    if isinstance(exc, PrometheusUnavailable):
        return Failure("retry", reasons.PROMETHEUS_UNAVAILABLE, str(exc))
    if isinstance(exc, kopf.TemporaryError):
        return Failure("retry", reasons.RECONCILE_FAILED, str(exc))
    if isinstance(exc, kopf.PermanentError):
        return Failure("failed", reasons.RECONCILE_FAILED, str(exc))
    return Failure("error", reasons.RECONCILE_FAILED, f"{type(exc).__name__}: {exc}")


def fail_ready(body: Mapping[str, Any], patch: kopf.Patch, reason: str, message: str) -> None:
    """Ready=False and Degraded=True with ``reason``, into a kopf patch."""
    meta = body.get("metadata", {})
    generation = int(meta.get("generation", 0))
    existing = [
        Condition.model_validate(c) for c in (body.get("status") or {}).get("conditions", [])
    ]
    now = dt.datetime.now(dt.UTC)
    conds = set_condition(
        existing, reasons.READY, "False", reason, message, generation=generation, now=now
    )
    conds = set_condition(
        conds, reasons.DEGRADED, "True", reason, message, generation=generation, now=now
    )
    patch.status["conditions"] = [c.model_dump(by_alias=True) for c in conds]
    patch.status["observedGeneration"] = generation
    patch.status["phase"] = "Failed"


def reconciler(kind: str) -> Callable[[Handler], Handler]:
    """Wrap an ``on.*`` handler with the error mapping and the reconcile metrics."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def handler(**kwargs: Any) -> Any:
            started = time.perf_counter()
            result = "error"
            body, patch, retry = kwargs["body"], kwargs["patch"], int(kwargs.get("retry", 0))
            try:
                value = await fn(**kwargs)
                result = "success"
                return value
            except Exception as exc:
                failure = classify(exc)
                result = failure.result
                if failure.result == "error":
                    raise
                if failure.result == "invalid":
                    fail_ready(body, patch, failure.reason, failure.message)
                    events.post(body, "Warning", failure.reason, failure.message)
                if isinstance(exc, kopf.TemporaryError | kopf.PermanentError):
                    raise
                if failure.result == "retry":
                    raise kopf.TemporaryError(failure.message, delay=backoff(retry)) from exc
                raise kopf.PermanentError(failure.message) from exc
            finally:
                RECONCILES.labels(kind, result).inc()
                RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)

        return handler

    return wrap
