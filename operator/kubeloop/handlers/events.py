"""Kubernetes Events: what a human should see in `kubectl describe`.

The one place handlers post Events (kopf queues and posts them in the background).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

import kopf

EventType = Literal["Normal", "Warning"]


def post(body: Mapping[str, Any], type_: EventType | str, reason: str, message: str) -> None:
    # kopf reads only apiVersion/kind/metadata from the body: any mapping will do.
    kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message[:1024])
