"""Child names and the error adapter."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pytest

from kubeloop.api.model_version import ModelVersion
from kubeloop.backends.kube import ApiError, NotFound
from kubeloop.handlers import events
from kubeloop.handlers.errors import InvalidSpec, backoff, reconciler
from kubeloop.planning.naming import child_name


def test_child_names_are_stable_and_bounded() -> None:
    assert child_name("kubeloop-registry", "churn") == "kubeloop-registry-churn"
    long = child_name("x" * 60, "y" * 60)
    assert len(long) == 63
    assert long == child_name("x" * 60, "y" * 60)
    assert long != child_name("x" * 60, "z" * 60)


def test_backoff_grows_and_caps() -> None:
    assert [backoff(r) for r in range(4)] == [2, 4, 8, 16]
    assert backoff(30) == 120


@pytest.fixture(autouse=True)
def posted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Events are posted through kopf to the API: record them at that boundary."""
    seen: list[tuple[str, str, str]] = []
    monkeypatch.setattr(events, "post", lambda body, t, r, m: seen.append((t, r, m)))
    return seen


BODY = {
    "apiVersion": "kubeloop.dev/v1alpha1",
    "kind": "ModelVersion",
    "metadata": {"name": "m-v1", "namespace": "ns", "generation": 4},
    "spec": {"modelName": "m", "version": 1, "artifact": {"uri": "s3://b/k"}},
}


async def _call(exc: Exception) -> kopf.Patch:
    @reconciler("ModelVersion")
    async def handler(**_: Any) -> None:
        raise exc

    patch = kopf.Patch()
    with pytest.raises((kopf.TemporaryError, kopf.PermanentError)) as info:
        await handler(body=BODY, patch=patch, retry=1)
    patch["raised"] = type(info.value).__name__
    return patch


@pytest.mark.parametrize("status", [404, 409, 429, 500, 503])
async def test_retryable_api_errors_become_temporary(status: int) -> None:
    patch = await _call(ApiError(status, "X", "y") if status != 404 else NotFound(404, "", ""))
    assert patch["raised"] == "TemporaryError"
    assert "conditions" not in patch.status


async def test_forbidden_is_permanent() -> None:
    patch = await _call(ApiError(403, "Forbidden", "no"))
    assert patch["raised"] == "PermanentError"


async def test_invalid_spec_marks_ready_false_with_field(
    posted: list[tuple[str, str, str]],
) -> None:
    patch = await _call(InvalidSpec("spec.model.modelVersion.namespace", "refused"))
    assert posted == [("Warning", "InvalidSpec", "spec.model.modelVersion.namespace: refused")]
    assert patch["raised"] == "PermanentError"
    ready = patch.status["conditions"][0]
    assert ready["type"] == "Ready"
    assert ready["status"] == "False"
    assert "spec.model.modelVersion.namespace" in ready["message"]
    assert patch.status["observedGeneration"] == 4


async def test_model_validation_error_names_the_field() -> None:
    bad = {**BODY, "spec": {**BODY["spec"], "version": "one"}}  # type: ignore[dict-item]

    @reconciler("ModelVersion")
    async def handler(body: Any, **_: Any) -> None:
        ModelVersion.parse(body)

    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError, match=r"spec\.version"):
        await handler(body=bad, patch=patch, retry=0)
    assert patch.status["conditions"][0]["reason"] == "InvalidSpec"


class _Stopped:
    """A daemon's stop flag whose wait records the delay instead of sleeping (the clock is a
    boundary); it stops the daemon after ``passes`` waits."""

    def __init__(self, passes: int) -> None:
        self.waits: list[float] = []
        self.passes = passes

    def __bool__(self) -> bool:
        return len(self.waits) >= self.passes

    async def wait(self, delay: float) -> None:
        self.waits.append(delay)


async def test_daemon_backs_off_with_the_shared_policy_and_warns_once(
    posted: list[tuple[str, str, str]],
) -> None:
    from kubeloop.backends.executor import ExecutorError
    from kubeloop.handlers import daemon

    outcomes: list[Exception | float | None] = [
        ExecutorError("KFP answered 503", temporary=True),
        ApiError(500, "InternalError", "etcd"),
        TimeoutError("slow"),
        ExecutorError("KFP answered 503", temporary=True),
        30.0,  # a healthy pass asks for 30 s: the daemon still looks again within POLL_S
        None,  # idle
        ApiError(403, "Forbidden", "no"),  # will not heal: look again now and then
    ]

    async def one_pass() -> float | None:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    stopped = _Stopped(passes=7)
    await daemon.run("TrainingRun", BODY, stopped, logging.getLogger("t"), one_pass)  # type: ignore[arg-type]
    assert stopped.waits == [2, 4, 8, 16, daemon.POLL_S, daemon.POLL_S, 30.0]
    # The third failure in a row says so once, with the reason of what failed.
    assert posted == [("Warning", "ApiUnavailable", "API unreachable: TimeoutError('slow')")]


@pytest.mark.parametrize(
    ("exc", "result"),
    [
        (InvalidSpec("spec.x", "bad"), "invalid"),
        (ApiError(429, "TooMany", "slow down"), "retry"),
        (ApiError(422, "Invalid", "no"), "failed"),
        (ValueError("a bug"), "error"),
    ],
)
def test_one_table_says_what_retries(exc: Exception, result: str) -> None:
    from kubeloop.handlers.errors import classify

    assert classify(exc).result == result


class _FakeKube:
    """The API at the boundary: records status patches and applies them to the live body, as
    the watch would."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.patches: list[dict[str, Any]] = []

    async def patch(
        self, _kind: Any, _ns: str, _name: str, patch: dict[str, Any], **_: Any
    ) -> None:
        self.patches.append(patch)
        self.body.setdefault("status", {}).update(patch["status"])


async def test_a_fault_that_persists_is_a_degraded_condition_until_a_pass_succeeds(
    posted: list[tuple[str, str, str]],
) -> None:
    from kubeloop.backends.kube import TRAINING_RUNS
    from kubeloop.backends.prometheus import PrometheusUnavailable
    from kubeloop.handlers import daemon

    body: dict[str, Any] = {**BODY, "status": {"conditions": []}}
    kube = _FakeKube(body)
    down = PrometheusUnavailable("connection refused")
    outcomes: list[Exception | float] = [down, down, down, down, 1.0, 1.0]

    async def one_pass() -> float | None:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    await daemon.run(
        "TrainingRun",
        body,
        _Stopped(passes=6),  # type: ignore[arg-type]
        logging.getLogger("t"),
        one_pass,
        kube=kube,  # type: ignore[arg-type]
        resource=TRAINING_RUNS,
    )
    marks = [
        next(c for c in p["status"]["conditions"] if c["type"] == "Degraded") for p in kube.patches
    ]
    # Written when it turns (the third failure) and when it heals, not on every pass.
    assert [(m["status"], m["reason"]) for m in marks] == [
        ("True", "PrometheusUnavailable"),
        ("False", "Recovered"),
    ]
    assert "connection refused" in marks[0]["message"]
    assert posted == [("Warning", "PrometheusUnavailable", "connection refused")]
