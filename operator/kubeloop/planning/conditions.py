"""Conditions with Kubernetes semantics: lastTransitionTime moves only when status flips."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from kubeloop.api.base import Condition

Status = Literal["True", "False", "Unknown"]


def rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> dt.datetime:
    """The inverse of :func:`rfc3339` (``2026-11-26T12:00:00Z``), timezone-aware."""
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: Status,
    reason: str,
    message: str,
    *,
    generation: int,
    now: dt.datetime,
) -> list[Condition]:
    """Return a new list with ``type_`` set; other conditions are kept in order."""
    previous = find(conditions, type_)
    moved = previous is None or previous.status != status
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:32768],
        last_transition_time=rfc3339(now)
        if moved or previous is None
        else previous.last_transition_time,
        observed_generation=generation,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c.type == type_ else c for c in conditions]


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    found = find(conditions, type_)
    return found is not None and found.status == "True"
