"""Conditions with Kubernetes semantics: lastTransitionTime moves only when status flips."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from kubeloop.api.base import Condition
from kubeloop.contract.durations import rfc3339

Status = Literal["True", "False", "Unknown"]


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
