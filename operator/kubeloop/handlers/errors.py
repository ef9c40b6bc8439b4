"""One adapter from failures to kopf's retry semantics, and the edge parser.

- API 404/409/429/5xx, connection errors, timeouts  → kopf.TemporaryError with backoff
- a spec the models reject (pydantic)                → Ready=False InvalidSpec + PermanentError
- anything else                                      → re-raised with its traceback
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import kopf
import pydantic

from kubeloop import reasons
from kubeloop.api.base import Condition, Resource
from kubeloop.backends.kube import ApiError
from kubeloop.handlers import events
from kubeloop.handlers.runtime import RECONCILE_SECONDS, RECONCILES
from kubeloop.planning.conditions import set_condition

R = TypeVar("R", bound=Resource)
Handler = Callable[..., Awaitable[Any]]


class InvalidSpec(Exception):
    """The spec is well-formed but cannot be acted on (e.g. a cross-namespace reference)."""

    def __init__(self, field: str, message: str, reason: str = reasons.INVALID_SPEC) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


def backoff(retry: int, base: float = 2.0, cap: float = 120.0) -> float:
    return float(min(cap, base * 2 ** max(retry, 0)))


def parse(model: type[R], body: Mapping[str, Any]) -> R:
    """The request body becomes a model at the edge, before any logic runs."""
    return model.model_validate(dict(body))


def describe_validation_error(error: pydantic.ValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return field, f"{field}: {first['msg']} (got {shown[:200]})"


def _fail_ready(body: Mapping[str, Any], patch: kopf.Patch, reason: str, message: str) -> None:
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
    """Wrap a handler with error mapping and the operator's reconcile metrics."""

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
            except pydantic.ValidationError as exc:
                result = "invalid"
                _field, message = describe_validation_error(exc)
                _fail_ready(body, patch, reasons.INVALID_SPEC, message)
                events.post(body, "Warning", reasons.INVALID_SPEC, message)
                raise kopf.PermanentError(message) from exc
            except InvalidSpec as exc:
                result = "invalid"
                _fail_ready(body, patch, exc.reason, str(exc))
                events.post(body, "Warning", exc.reason, str(exc))
                raise kopf.PermanentError(str(exc)) from exc
            except ApiError as exc:
                if not exc.retryable:
                    result = "failed"
                    raise kopf.PermanentError(str(exc)) from exc
                result = "retry"
                raise kopf.TemporaryError(str(exc), delay=backoff(retry)) from exc
            except (TimeoutError, aiohttp.ClientError) as exc:
                result = "retry"
                raise kopf.TemporaryError(
                    f"API unreachable: {exc!r}", delay=backoff(retry)
                ) from exc
            except kopf.TemporaryError:
                result = "retry"
                raise
            except kopf.PermanentError:
                result = "failed"
                raise
            finally:
                RECONCILES.labels(kind, result).inc()
                RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)

        return handler

    return wrap
