"""The serving backends' common interface: local processes or KServe InferenceServices.

A backend makes the world match one decision — which version is stable, which is the canary
and what share of traffic the canary gets — and reports what it sees. The rollout itself
(steps, analysis, promotion, rollback) is decided in ``planning/canary.py``.
"""

from __future__ import annotations

from typing import Protocol

from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.planning.placement import Placement, ServingState


class ServingBackend(Protocol):
    async def observe(self, md: ModelDeployment, placement: Placement) -> ServingState:
        """What is served for ``placement`` now, without changing anything."""
        ...

    async def apply(self, md: ModelDeployment, placement: Placement) -> ServingState:
        """Idempotently serve ``placement`` for ``md`` (deterministic names, no duplicates)."""
        ...

    async def delete(self, md: ModelDeployment) -> None:
        """Remove everything served for ``md``."""
        ...
