"""The rollout state machine, without any server: every transition and every refusal."""

from __future__ import annotations

import dataclasses
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
    approval: canary.Approval | None = None,
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
        approval=approval,
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


# --- approval before the last step ---------------------------------------------------------


def annotated(value: str | None = None) -> canary.Approval:
    """ModelDeployment team-a/churn, with kubeloop.dev/approve=``value`` (None: without)."""
    return canary.Approval("churn", "team-a", value)


def manual(**rollout: Any) -> ModelDeploymentSpec:
    return spec(approval="manual", **rollout)


def at_the_hold(sp: ModelDeploymentSpec) -> canary.Decision:
    """m-v2 through step 0 (10 %) and step 1 (50 %, the step before the last) at 120 s."""
    d = step(sp, serving(), "m-v2", 0)
    d = step(sp, d.status, "m-v2", 60, HEALTHY, approval=annotated())
    assert d.weight == 50
    return step(sp, d.status, "m-v2", 120, HEALTHY, approval=annotated())


def reasons_of(d: canary.Decision) -> list[str]:
    return [reason for _type, reason, _message in d.events]


def progressing(d: canary.Decision) -> tuple[str, str, str]:
    cond = find(d.status.conditions, "Progressing")
    assert cond is not None
    return cond.status, cond.reason, cond.message


def test_manual_approval_holds_the_step_before_the_last_until_annotated() -> None:
    sp = manual()
    d = at_the_hold(sp)
    assert (d.canary, d.weight, d.status.current_step) == ("m-v2", 50, 1)
    assert d.status.phase == "Progressing"
    command = "kubectl annotate modeldeployment churn kubeloop.dev/approve=m-v2 -n team-a"
    assert reasons_of(d) == ["AwaitingApproval"]
    assert command in d.events[0][2]
    status, reason, message = progressing(d)
    assert (status, reason) == ("True", "AwaitingApproval")
    assert command in message
    # Held: the analyses go on passing, yet it stays at 50 % and says nothing more ...
    for at in (180, 240, 300):
        d = step(sp, d.status, "m-v2", at, HEALTHY, approval=annotated())
        assert (d.weight, d.events, d.promoted) == (50, [], None)
    # ... an annotation naming another version does not approve it, and the message says so.
    d = step(sp, d.status, "m-v2", 310, approval=annotated("m-v9"))
    assert (d.weight, d.clear_approval) == (50, False)
    assert "kubeloop.dev/approve=m-v9 names another version" in progressing(d)[2]
    # Approved: the last step at once, one Event, and the annotation is to be removed.
    d = step(sp, d.status, "m-v2", 320, approval=annotated("m-v2"))
    assert (d.weight, d.status.current_step, d.clear_approval) == (100, 2, True)
    assert reasons_of(d) == ["Approved"]
    assert progressing(d)[1] == "Approved"
    # ... then it concludes as usual: the last step's own analysis, a full interval later.
    assert not step(sp, d.status, "m-v2", 350).analyse
    d = step(sp, d.status, "m-v2", 380, HEALTHY)
    assert (d.stable, d.promoted, d.status.phase) == ("m-v2", "m-v2", "Serving")
    assert (d.status.approval_requested_at, d.status.approved_at) == ("", "")


def test_approval_by_true_or_given_before_the_hold() -> None:
    sp = manual()
    assert step(sp, at_the_hold(sp).status, "m-v2", 130, approval=annotated("true")).weight == 100
    # Annotated before the step passed: no wait, and only the Approved Event.
    d = step(sp, serving(), "m-v2", 0)
    d = step(sp, d.status, "m-v2", 60, HEALTHY, approval=annotated("m-v2"))
    d = step(sp, d.status, "m-v2", 120, HEALTHY, approval=annotated("m-v2"))
    assert (d.weight, reasons_of(d)) == (100, ["Approved"])


def test_without_approval_the_canary_walks_on_past_the_step_before_the_last() -> None:
    d = at_the_hold(spec())
    assert (d.weight, reasons_of(d)) == (100, ["CanaryAdvanced"])


def test_the_wait_for_approval_does_not_count_against_max_duration() -> None:
    sp = manual(maxDuration="10m")
    d = at_the_hold(sp)  # 120 s of rollout, then the wait
    d = step(sp, d.status, "m-v2", 3 * 3600, approval=annotated())
    assert (d.canary, d.weight) == ("m-v2", 50)  # three hours on: still waiting
    d = step(sp, d.status, "m-v2", 3 * 3600 + 1, approval=annotated("m-v2"))
    assert d.weight == 100
    # The clock runs again from approval: the 10 minutes end 480 s after it.
    assert step(sp, d.status, "m-v2", 3 * 3600 + 470).canary == "m-v2"
    late = step(sp, d.status, "m-v2", 3 * 3600 + 490)
    assert (late.canary, late.status.phase) == (None, "RolledBack")
    assert "maxDuration" in late.status.history[-1].reason


def test_a_waiting_canary_is_still_analysed_and_rolls_back_when_it_fails() -> None:
    sp = manual(analysis={"failureLimit": 1})
    d = at_the_hold(sp)
    assert not step(sp, d.status, "m-v2", 150).analyse  # one interval after the last analysis
    assert step(sp, d.status, "m-v2", 180).analyse
    broken = Measurements(requests=400, error_rate=0.5, p99_latency_ms=20, prediction_shift=0)
    d = step(sp, d.status, "m-v2", 180, broken)
    assert (d.canary, d.status.phase) == (None, "RolledBack")
    assert "errorRate=0.5" in d.status.history[-1].reason


@pytest.mark.parametrize(("action", "result"), [("promote", "Promoted"), ("abort", "Aborted")])
def test_manual_actions_still_work_while_waiting_for_approval(action: str, result: str) -> None:
    d = at_the_hold(manual())
    acted = step(manual().model_copy(update={"manual_action": action}), d.status, "m-v2", 130)
    assert (acted.canary, acted.weight, acted.reset_manual_action) == (None, 0, True)
    assert acted.status.history[-1].result == result
    assert acted.stable == ("m-v2" if action == "promote" else "m-v1")


def test_switching_approval_off_releases_the_hold_at_the_next_analysis() -> None:
    d = at_the_hold(manual())
    assert step(spec(), d.status, "m-v2", 180, HEALTHY).weight == 100


# --- labelled accuracy ---------------------------------------------------------------------

LABELLED = spec(analysis={"maxAccuracyDrop": 0.02, "minLabelledRows": 50})


def labelled(task: str, mine: float | None, theirs: float, **over: Any) -> Measurements:
    rows = {"canary_rows": 500.0, "stable_rows": 500.0}
    quality = canary.LabelledQuality(task, mine, theirs, **{**rows, **over})  # type: ignore[arg-type]
    return dataclasses.replace(HEALTHY, labelled=quality)


def labelled_results(sp: ModelDeploymentSpec, m: Measurements) -> dict[str, tuple[Any, str]]:
    results = canary.judge(sp, m, 0, T0)
    return {r.check: (r.value, r.verdict) for r in results if r.check.startswith("labelled")}


@pytest.mark.parametrize(
    ("task", "mine", "theirs", "drop", "verdict"),
    [
        ("classification", 0.90, 0.91, 0.01, "Pass"),  # 1 point worse: within 2
        ("classification", 0.88, 0.91, 0.03, "Fail"),
        ("classification", 0.95, 0.91, -0.04, "Pass"),  # better
        ("regression", 10.1, 10.0, 0.01, "Pass"),  # MAE 1 % higher: within 2 %
        ("regression", 10.5, 10.0, 0.05, "Fail"),
        ("regression", 9.0, 10.0, -0.1, "Pass"),
    ],
)
def test_labelled_accuracy_is_compared_with_the_stable(
    task: str, mine: float, theirs: float, drop: float, verdict: str
) -> None:
    got = labelled_results(LABELLED, labelled(task, mine, theirs))
    assert got["labelledRows"] == (500, "Pass")
    value, seen = got["labelledAccuracyDrop"]
    assert (value, seen) == (pytest.approx(drop), verdict)


@pytest.mark.parametrize(
    "m",
    [
        labelled("classification", 0.5, 0.9, canary_rows=49),
        labelled("classification", 0.5, 0.9, stable_rows=10),
        labelled("classification", None, 0.9),  # no accuracy series for the canary
        dataclasses.replace(labelled("classification", 0.5, 0.9), requests=3),
        HEALTHY,  # not measured (no task known, or Prometheus unavailable)
    ],
    ids=["few-canary-rows", "few-stable-rows", "no-accuracy", "few-requests", "not-measured"],
)
def test_labelled_accuracy_on_too_little_data_is_inconclusive_and_holds(m: Measurements) -> None:
    assert labelled_results(LABELLED, m)["labelledAccuracyDrop"][1] == "Inconclusive"
    d = step(LABELLED, step(LABELLED, serving(), "m-v2", 0).status, "m-v2", 60, m)
    assert (d.weight, d.status.failed_checks) == (10, 0)  # neither advanced nor failed


def test_a_less_accurate_canary_rolls_back_and_the_check_is_off_unless_set() -> None:
    worse = labelled("classification", 0.80, 0.95)
    assert labelled_results(spec(), worse) == {}
    sp = spec(analysis={"maxAccuracyDrop": 0.02, "failureLimit": 1})
    d = step(sp, step(sp, serving(), "m-v2", 0).status, "m-v2", 60, worse)
    assert (d.canary, d.status.phase) == (None, "RolledBack")
    assert "labelledAccuracyDrop=0.15" in d.status.history[-1].reason
