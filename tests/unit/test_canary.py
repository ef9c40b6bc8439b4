"""The rollout state machine, without any server: every transition and every refusal."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from kubeloop.api.model_deployment import ModelDeploymentSpec, ModelDeploymentStatus
from kubeloop.contract import durations
from kubeloop.planning import canary
from kubeloop.planning.canary import Measurements, Target, plan_rollout, psi
from kubeloop.planning.conditions import find

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
HEALTHY = Measurements(requests=500, error_rate=0.0, p99_latency_ms=20, prediction_shift=0.01)


def spec(**rollout: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {
            "model": {"alias": {"modelName": "m", "alias": "production"}},
            "rollout": {"steps": [10, 50, 100], "interval": "60s", "maxDuration": "1h", **rollout},
        }
    )


def step(
    sp: ModelDeploymentSpec,
    st: ModelDeploymentStatus,
    target: str | None,
    at: float,
    m: Measurements | None = None,
    *,
    canary_ready: bool = True,
) -> canary.Decision:
    return plan_rollout(
        sp,
        st,
        Target(target),
        generation=1,
        stable_ready=True,
        canary_ready=canary_ready,
        measurements=m,
        now=T0 + dt.timedelta(seconds=at),
    )


def serving(version: str = "m-v1") -> ModelDeploymentStatus:
    return step(spec(), ModelDeploymentStatus(), version, 0).status


def test_first_version_is_served_without_a_canary() -> None:
    d = step(spec(), ModelDeploymentStatus(), "m-v1", 0)
    assert (d.stable, d.canary, d.weight) == ("m-v1", None, 0)
    assert d.status.phase == "Serving"
    ready = find(d.status.conditions, "Ready")
    assert ready is not None
    assert ready.status == "True"


def test_a_healthy_canary_walks_every_step_then_is_promoted() -> None:
    sp, st = spec(), serving()
    d = step(sp, st, "m-v2", 0)
    assert (d.canary, d.weight, d.status.phase) == ("m-v2", 10, "Progressing")
    assert d.events[-1][1] == "CanaryStarted"
    d = step(sp, d.status, "m-v2", 30)
    assert (d.weight, d.analyse) == (10, False)  # not due yet
    assert d.requeue_after == pytest.approx(30)
    d = step(sp, d.status, "m-v2", 60)
    assert d.analyse  # due: the handler measures and calls again
    weights = []
    at = 60.0
    while d.canary is not None:
        d = step(sp, d.status, "m-v2", at, HEALTHY)
        weights.append(d.weight)
        at += 60
    assert weights == [50, 100, 0]
    assert (d.stable, d.promoted, d.status.phase) == ("m-v2", "m-v2", "Serving")
    assert d.status.history[-1].result == "Promoted"


def test_too_little_traffic_holds_the_step_and_never_promotes() -> None:
    sp, st = spec(), serving()
    d = step(sp, st, "m-v2", 0)
    quiet = Measurements(requests=3, error_rate=0.0, p99_latency_ms=10, prediction_shift=0.0)
    for i in range(1, 30):
        d = step(sp, d.status, "m-v2", 60 * i, quiet)
        assert (d.canary, d.weight) == ("m-v2", 10)
    assert {r.verdict for r in d.status.analysis} == {"Inconclusive"}
    assert d.status.history == []


@pytest.mark.parametrize("missing", ["error_rate", "p99_latency_ms", "prediction_shift"])
def test_a_missing_metric_is_inconclusive_never_a_pass(missing: str) -> None:
    sp, st = spec(), serving()
    d = step(sp, st, "m-v2", 0)
    partial = Measurements(**{**HEALTHY.__dict__, missing: None})
    d = step(sp, d.status, "m-v2", 60, partial)
    assert d.weight == 10
    assert "Inconclusive" in {r.verdict for r in d.status.analysis}


def test_failing_checks_roll_back_at_the_failure_limit_and_stay_rolled_back() -> None:
    sp, st = spec(), serving()
    broken = Measurements(requests=400, error_rate=0.9, p99_latency_ms=20, prediction_shift=0)
    d = step(sp, st, "m-v3", 0)
    d = step(sp, d.status, "m-v3", 60, broken)
    assert (d.canary, d.weight, d.status.failed_checks) == ("m-v3", 10, 1)
    d = step(sp, d.status, "m-v3", 120, broken)
    assert (d.stable, d.canary, d.weight) == ("m-v1", None, 0)
    assert d.status.phase == "RolledBack"
    assert "errorRate=0.9" in d.status.history[-1].reason
    degraded = find(d.status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.status == "True"
    # The same version is not retried by itself ...
    later = step(sp, d.status, "m-v3", 600, HEALTHY)
    assert (later.canary, later.weight) == (None, 0)
    # ... a new version starts a new rollout.
    assert step(sp, later.status, "m-v4", 660).canary == "m-v4"


def test_a_new_version_mid_rollout_restarts_the_analysis_for_it() -> None:
    sp, st = spec(), serving()
    d = step(sp, st, "m-v2", 0)
    d = step(sp, d.status, "m-v2", 60, HEALTHY)
    assert d.weight == 50
    d = step(sp, d.status, "m-v3", 90)
    assert (d.canary, d.weight, d.status.current_step) == ("m-v3", 10, 0)
    assert d.status.history[-1].result == "Superseded"


def test_manual_abort_promote_and_pause() -> None:
    st = serving()
    d = step(spec(), st, "m-v2", 0)
    aborted = step(
        ModelDeploymentSpec.model_validate(
            {**spec().model_dump(by_alias=True), "manualAction": "abort"}
        ),
        d.status,
        "m-v2",
        10,
    )
    assert (aborted.canary, aborted.reset_manual_action) == (None, True)
    assert aborted.status.history[-1].result == "Aborted"
    promoted = step(
        ModelDeploymentSpec.model_validate(
            {**spec().model_dump(by_alias=True), "manualAction": "promote"}
        ),
        d.status,
        "m-v2",
        10,
    )
    assert (promoted.stable, promoted.promoted) == ("m-v2", "m-v2")
    paused = step(
        ModelDeploymentSpec.model_validate({**spec().model_dump(by_alias=True), "paused": True}),
        d.status,
        "m-v2",
        600,
        HEALTHY,
    )
    assert (paused.status.phase, paused.weight) == ("Paused", 10)


def test_a_canary_that_does_not_load_gets_no_analysis_and_times_out() -> None:
    sp, st = spec(maxDuration="5m"), serving()
    d = step(sp, st, "m-v2", 0)
    for at in (60, 120, 240):
        d = step(sp, d.status, "m-v2", at, HEALTHY, canary_ready=False)
        assert not d.analyse
        assert d.weight == 10
    d = step(sp, d.status, "m-v2", 301, canary_ready=False)
    assert (d.canary, d.status.phase) == (None, "RolledBack")
    assert "maxDuration" in d.status.history[-1].reason


def test_immediate_strategy_and_unresolvable_targets() -> None:
    d = step(spec(strategy="immediate"), serving(), "m-v2", 0)
    assert (d.stable, d.canary, d.promoted) == ("m-v2", None, "m-v2")
    st = serving()
    kept = plan_rollout(
        spec(),
        st,
        Target(None, "ModelVersion 'm-v9' not found", "ModelVersionNotFound"),
        generation=2,
        stable_ready=True,
        canary_ready=False,
        measurements=None,
        now=T0,
    )
    assert kept.stable == "m-v1"
    degraded = find(kept.status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.reason == "ModelVersionNotFound"


def test_psi() -> None:
    same = {"0": 50.0, "1": 50.0}
    assert psi(same, same) == pytest.approx(0)
    shifted = psi(same, {"0": 90.0, "1": 10.0})
    assert shifted is not None
    assert shifted > 0.25
    assert psi({}, same) is None
    assert psi(same, {"0": 0.0}) is None


def test_durations() -> None:
    assert durations.seconds("1m30s") == 90
    assert durations.seconds("250ms") == 0.25
    assert durations.seconds("2h") == 7200


def test_analysis_is_due_exactly_when_the_plan_would_judge_the_step() -> None:
    sp, st = spec(), serving()
    started = step(sp, st, "m-v2", 0).status

    def due(status: ModelDeploymentStatus, at: float, **kw: Any) -> bool:
        args: dict[str, Any] = {"canary_ready": True, "now": T0 + dt.timedelta(seconds=at)}
        return canary.analysis_due(kw.pop("sp", sp), status, kw.pop("target", "m-v2"),
                                   **{**args, **kw})  # fmt: skip

    assert not due(st, 120)  # no canary yet
    assert not due(started, 30)  # the interval has not passed
    assert due(started, 60)
    assert step(sp, started, "m-v2", 60).analyse  # the plan agrees: it wants measurements
    assert not due(started, 60, canary_ready=False)
    assert not due(started, 60, target="m-v3")  # a new target restarts the rollout instead
    assert not due(started, 60, sp=spec().model_copy(update={"paused": True}))
