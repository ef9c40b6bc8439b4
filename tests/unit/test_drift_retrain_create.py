"""The policy's retrain create and the 409s it can meet (``handlers/drift_policy.py``): the API
server is the boundary, scripted here; the planner's decisions are tested in
test_drift_policy.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from kubeloop.backends.kube import Conflict, NotFound
from kubeloop.contract.labels import DRIFT_POLICY_LABEL
from kubeloop.handlers import drift_policy, errors
from tests.unit.test_drift_policy import policy

RETRAIN = {
    "metadata": {"name": "fraud-drift-retrain-1", "labels": {DRIFT_POLICY_LABEL: "fraud-drift"}}
}


class Server:
    """Answers a create, then the read that follows a 409."""

    def __init__(self, create: Exception | None, existing: dict[str, Any] | None) -> None:
        self.create_answer, self.existing = create, existing
        self.created: list[dict[str, Any]] = []

    async def create(self, _kind: Any, _ns: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.create_answer is not None:
            raise self.create_answer
        self.created.append(body)
        return body

    async def get(self, _kind: Any, _ns: str, name: str) -> dict[str, Any]:
        if self.existing is None:
            raise NotFound(404, "NotFound", name)
        return self.existing


def create(server: Server) -> None:
    ctx = SimpleNamespace(kube=server)
    asyncio.run(drift_policy._create_retrain(ctx, policy(), RETRAIN))  # type: ignore[arg-type]


def conflict() -> Conflict:
    return Conflict(409, "AlreadyExists", "exists")


def test_created() -> None:
    server = Server(None, None)
    create(server)
    assert server.created == [RETRAIN]


def test_a_409_for_our_own_retrain_is_adopted() -> None:
    create(Server(conflict(), RETRAIN))  # a pass before a restart created it: no error


def test_a_refused_create_fails_the_pass_so_it_is_retried() -> None:
    """Nothing of that name exists: the 409 refused the create itself. Recording it as
    started would later find the retrain gone and retrain the same breach again."""
    with pytest.raises(Conflict):
        create(Server(conflict(), None))


def test_a_name_taken_by_another_object_is_not_adopted() -> None:
    theirs = {"metadata": {"name": "fraud-drift-retrain-1", "labels": {}}}
    with pytest.raises(errors.InvalidSpec, match="not create"):
        create(Server(conflict(), theirs))
