"""The TrainingRun state machine, without any server: attempts, budget, progress, gates."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from kubeloop import reasons
from kubeloop.api.training_run import TrainingRunSpec, TrainingRunStatus
from kubeloop.planning.conditions import find
from kubeloop.planning.training_run import (
    Observed,
    RunView,
    executor_error,
    is_approved,
    pipeline_spec,
    plan_training,
    spec_problem,
)

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def spec(**extra: Any) -> TrainingRunSpec:
    body: dict[str, Any] = {
        "data": {"uri": "builtin://breast-cancer", "target": "label"},
        "registration": {"modelName": "cancer"},
        "evaluation": {"gates": [{"metric": "f1", "op": ">=", "value": 0.9}]},
    }
    body.update(extra)
    return TrainingRunSpec.model_validate(body)


def obs(**fields: Any) -> Observed:
    base: dict[str, Any] = {"generation": 1, "now": NOW, "spec_hash": "a" * 64}
    base.update(fields)
    return Observed(**base)


def ready(status: TrainingRunStatus) -> tuple[str, str, str]:
    cond = find(status.conditions, "Ready")
    assert cond is not None
    return cond.status, cond.reason, cond.message


def running(**extra: Any) -> TrainingRunStatus:
    first = plan_training(spec(), TrainingRunStatus(), obs())
    status = first.status
    status.run_id = "local-1"
    for key, value in extra.items():
        setattr(status, key, value)
    return status


def test_first_pass_submits_attempt_one_with_the_pipeline_hash() -> None:
    decision = plan_training(spec(), TrainingRunStatus(), obs())
    assert decision.submit
    assert decision.status.phase == "Running"
    assert decision.status.attempt == 1
    assert decision.status.spec_hash == "a" * 64
    assert ready(decision.status)[:2] == ("False", reasons.RUNNING)
    assert [e[1] for e in decision.events] == [reasons.ATTEMPT_STARTED, reasons.SUBMITTED]


def test_a_running_attempt_is_not_submitted_twice() -> None:
    decision = plan_training(spec(), running(), obs(run=RunView("Running")))
    assert not decision.submit
    assert decision.status.attempt == 1


def test_progress_shows_the_running_step_and_trials() -> None:
    steps = {
        "ingest": {"step": "ingest", "state": "Succeeded", "startedAt": "2026-11-26T11:00:00Z"},
        "tune": {
            "step": "tune",
            "state": "Running",
            "startedAt": "2026-11-26T11:01:00Z",
            "message": "trial 7/20",
            "trials": {
                "completed": 7,
                "total": 20,
                "pruned": 2,
                "bestParams": {"learningRate": 0.003},
                "bestValue": 0.91,
            },
        },
    }
    decision = plan_training(spec(), running(), obs(run=RunView("Running"), steps=steps))
    status = decision.status
    assert status.current_step == "tune"
    assert status.trials.progress == "7/20"
    assert status.trials.pruned == 2
    assert status.trials.best_params == {"learningRate": "0.003"}
    assert "trial 7/20" in ready(status)[2]
    assert (reasons.STEP_STARTED, "step tune") in [(e[1], e[2]) for e in decision.events]


def test_gpu_over_the_namespace_budget_waits_in_queued() -> None:
    gpu_spec = spec(resources={"gpu": 2})
    decision = plan_training(
        gpu_spec,
        TrainingRunStatus(),
        obs(gpu_limit=4, gpu_in_use=3, gpu_limit_source="ResourceQuota q"),
    )
    assert not decision.submit
    assert decision.status.phase == "Queued"
    state, reason, message = ready(decision.status)
    assert (state, reason) == ("False", reasons.QUEUED)
    assert "spec.resources.gpu=2" in message
    assert "3 of 4" in message
    # once GPUs free up, the queued attempt is submitted (still attempt 1)
    later = plan_training(gpu_spec, decision.status, obs(gpu_limit=4, gpu_in_use=2))
    assert later.submit
    assert later.status.attempt == 1
    assert later.status.phase == "Running"


def test_an_impossible_gpu_request_fails_naming_the_field() -> None:
    decision = plan_training(spec(resources={"gpu": 8}), TrainingRunStatus(), obs(gpu_limit=4))
    assert not decision.submit
    assert decision.status.phase == "Failed"
    state, reason, message = ready(decision.status)
    assert (state, reason) == ("False", reasons.GPU_REQUEST_IMPOSSIBLE)
    assert "spec.resources.gpu=8" in message


def test_a_compile_error_fails_the_attempt() -> None:
    decision = plan_training(spec(), TrainingRunStatus(), obs(compile_error="spec.x: bad"))
    assert decision.status.phase == "Failed"
    assert ready(decision.status)[1] == reasons.INVALID_SPEC


def test_a_permanent_step_error_names_the_field() -> None:
    steps = {
        "ingest": {
            "step": "ingest",
            "state": "Failed",
            "permanent": True,
            "field": "data.target",
            "message": "column 'nope' not found; columns are: a, b",
        }
    }
    decision = plan_training(spec(), running(), obs(run=RunView("Failed"), steps=steps))
    state, reason, message = ready(decision.status)
    assert (state, reason) == ("False", reasons.INVALID_INPUT)
    assert "step ingest failed: spec.data.target:" in message


def test_a_step_failing_after_retries_shows_the_log_tail() -> None:
    steps = {"train": {"step": "train", "state": "Failed", "tries": 3, "message": "CUDA OOM"}}
    run = RunView("Failed", failed_step="train", log_tail="line 1\nRuntimeError: CUDA OOM")
    decision = plan_training(spec(), running(), obs(run=run, steps=steps))
    _state, reason, message = ready(decision.status)
    assert reason == reasons.STEP_FAILED
    assert "step train failed after 3 tries: CUDA OOM" in message
    assert "RuntimeError: CUDA OOM" in message


def test_failed_gates_register_nothing() -> None:
    evaluation = {
        "metrics": {"f1": 0.8},
        "gatesPassed": False,
        "gates": [{"metric": "f1", "op": ">=", "threshold": 0.9, "actual": 0.8, "passed": False}],
        "gateSummary": "f1=0.8>=0.9 ✗",
    }
    decision = plan_training(
        spec(), running(), obs(run=RunView("Succeeded"), evaluation=evaluation)
    )
    assert not decision.register
    assert decision.status.phase == "Failed"
    assert ready(decision.status)[1] == reasons.GATES_FAILED
    gates = find(decision.status.conditions, "GatesPassed")
    assert gates is not None
    assert gates.status == "False"
    assert "f1=0.8>=0.9 ✗" in gates.message


def test_passed_gates_register_then_succeed() -> None:
    evaluation = {
        "metrics": {"f1": 0.97, "accuracy": 0.96},
        "gatesPassed": True,
        "gates": [
            {"metric": "f1", "op": ">=", "threshold": 0.9, "actual": 0.97, "text": "f1=0.97>=0.9 ✓"}
        ],
    }
    seen = obs(run=RunView("Succeeded"), evaluation=evaluation, manifest=True)
    first = plan_training(spec(), running(), seen)
    assert first.register
    assert first.status.phase == "Running"
    done = plan_training(
        spec(),
        first.status,
        obs(run=RunView("Succeeded"), evaluation=evaluation, manifest=True, registered="cancer-v3"),
    )
    assert not done.register
    assert done.status.phase == "Succeeded"
    assert done.status.model_version == "cancer-v3"
    assert done.status.best_metric == "f1=0.97"
    assert ready(done.status)[:2] == ("True", reasons.REGISTERED)


def test_a_spec_change_supersedes_the_running_attempt_and_keeps_history() -> None:
    # a spec change compiles to another pipeline (only spec.suspend does not: see below)
    changed = obs(generation=2, spec_hash="b" * 64, run=RunView("Running"))
    decision = plan_training(spec(), running(), changed)
    assert decision.cancel_run_id == "local-1"
    assert decision.cancel_attempt == 1
    assert decision.submit
    status = decision.status
    assert status.attempt == 2
    assert status.observed_generation == 2
    assert [(h.number, h.result) for h in status.history] == [(1, "Superseded")]


def test_a_lost_run_is_resubmitted_as_the_same_attempt() -> None:
    decision = plan_training(spec(), running(), obs(run=RunView("Unknown")))
    assert decision.submit
    assert decision.status.attempt == 1


@pytest.mark.parametrize(("minutes", "due"), [(30, False), (61, True)], ids=["not-yet", "due"])
def test_the_schedule_starts_a_new_attempt_when_due(minutes: int, due: bool) -> None:
    status = running(phase="Succeeded", started_at="2026-11-26T12:00:00Z")
    later = obs(now=NOW + dt.timedelta(minutes=minutes))
    decision = plan_training(spec(schedule="@hourly"), status, later)
    assert decision.submit is due
    if due:
        assert decision.status.attempt == 2
        assert decision.status.history[-1].result == "Succeeded"
        assert decision.status.last_scheduled_at
    else:
        assert 0 < decision.requeue_after <= 30 * 60


def test_an_attempt_past_its_timeout_is_stopped_and_failed() -> None:
    status = running(started_at="2026-11-26T10:00:00Z", current_step="train")
    decision = plan_training(spec(timeout="1h"), status, obs(run=RunView("Running")))
    assert decision.cancel_run_id == "local-1"
    assert decision.cancel_attempt == 1
    assert decision.status.phase == "Failed"
    state, reason, message = ready(decision.status)
    assert (state, reason) == ("False", reasons.TIMED_OUT)
    assert "spec.timeout=1h" in message


def test_steps_started_in_the_same_instant_show_the_later_pipeline_step() -> None:
    same = "2026-11-26T11:00:00Z"
    steps = {
        "ingest": {"step": "ingest", "state": "Succeeded", "startedAt": same},
        "preprocess": {"step": "preprocess", "state": "Succeeded", "startedAt": same},
    }
    decision = plan_training(spec(), running(), obs(run=RunView("Running"), steps=steps))
    assert decision.status.current_step == "preprocess"


def test_a_gate_or_objective_the_task_cannot_produce_is_named_before_running() -> None:
    regression = {"uri": "builtin://diabetes", "target": "progression", "task": "regression"}
    assert "spec.evaluation.gates[0].metric='f1'" in spec_problem(spec(data=regression))
    tuned = spec(
        data=regression,
        evaluation={"gates": [{"metric": "r2", "value": 0.3}]},
        tuning={
            "objective": {"metric": "roc_auc"},
            "searchSpace": [{"name": "dropout", "type": "float", "min": 0.0, "max": 0.5}],
        },
    )
    assert "spec.tuning.objective.metric='roc_auc'" in spec_problem(tuned)
    assert spec_problem(spec()) == ""


def test_an_executor_that_refuses_fails_the_attempt_and_an_unavailable_one_is_retried() -> None:
    refused, events = executor_error(
        running(), generation=1, now=NOW, message="400 pipeline rejected", temporary=False
    )
    assert refused.phase == "Failed"
    assert ready(refused)[1] == reasons.EXECUTOR_REJECTED
    assert "400 pipeline rejected" in ready(refused)[2]
    assert [e[1] for e in events] == [reasons.EXECUTOR_REJECTED]
    down, events = executor_error(
        running(), generation=1, now=NOW, message="connection refused", temporary=True
    )
    assert down.phase == "Running"
    assert ready(down)[1] == reasons.EXECUTOR_UNAVAILABLE
    assert events == []


# --- spec.suspend: held until approved -------------------------------------------------------


def condition(status: TrainingRunStatus, type_: str) -> tuple[str, str, str]:
    cond = find(status.conditions, type_)
    assert cond is not None, type_
    return cond.status, cond.reason, cond.message


def suspended_obs(**fields: Any) -> Observed:
    return obs(name="retrain-1", namespace="team-a", **fields)


def test_a_suspended_run_waits_for_approval_and_says_how_to_give_it() -> None:
    first = plan_training(spec(suspend=True), TrainingRunStatus(), suspended_obs())
    assert not first.submit
    assert first.status.phase == "Suspended"
    assert first.status.attempt == 1
    command = "kubectl annotate trainingrun retrain-1 kubeloop.dev/approve=true -n team-a"
    status, reason, message = condition(first.status, "Progressing")
    assert (status, reason) == ("False", reasons.AWAITING_APPROVAL)
    assert command in message
    assert ready(first.status)[:2] == ("False", reasons.SUSPENDED)
    assert [e[:2] for e in first.events] == [
        ("Normal", reasons.ATTEMPT_STARTED),
        ("Normal", reasons.SUSPENDED),
    ]
    assert command in first.events[1][2]
    assert first.requeue_after <= 2.0  # the annotation is looked for at every poll

    again = plan_training(spec(suspend=True), first.status, suspended_obs())
    assert not again.submit
    assert again.status.phase == "Suspended"
    assert again.events == []  # one Event when it starts waiting, not one per pass
    assert again.status.conditions == first.status.conditions


def test_approval_submits_the_held_attempt_with_an_approved_event() -> None:
    held = plan_training(spec(suspend=True), TrainingRunStatus(), suspended_obs()).status
    approved = plan_training(spec(suspend=True), held, suspended_obs(approved=True))
    assert approved.submit
    assert approved.status.phase == "Running"
    assert approved.status.attempt == 1
    assert [e[1] for e in approved.events] == [reasons.APPROVED, reasons.SUBMITTED]
    assert condition(approved.status, "Progressing")[:2] == ("True", reasons.APPROVED)
    assert ready(approved.status)[:2] == ("False", reasons.RUNNING)


def test_an_approved_run_still_waits_for_gpus() -> None:
    held = plan_training(spec(suspend=True), TrainingRunStatus(), suspended_obs()).status
    busy = suspended_obs(approved=True, gpu_limit=1, gpu_in_use=1)
    decision = plan_training(spec(suspend=True, resources={"gpu": 1}), held, busy)
    assert not decision.submit
    assert decision.status.phase == "Queued"
    assert [e[1] for e in decision.events] == [reasons.APPROVED, reasons.QUEUED]


def test_setting_suspend_false_resumes_the_same_attempt() -> None:
    held = plan_training(spec(suspend=True), TrainingRunStatus(), suspended_obs()).status
    # generation 2: only suspend changed, so the compiled pipeline (its hash) is the same
    decision = plan_training(spec(), held, suspended_obs(generation=2))
    assert decision.submit
    assert decision.status.attempt == 1
    assert decision.status.history == []
    assert decision.status.observed_generation == 2
    assert [e[1] for e in decision.events] == [reasons.SUBMITTED]
    assert condition(decision.status, "Progressing")[:2] == ("True", reasons.APPROVED)
    assert "spec.suspend=false" in condition(decision.status, "Progressing")[2]


def test_suspending_a_submitted_run_does_not_stop_it() -> None:
    decision = plan_training(
        spec(suspend=True), running(), obs(generation=2, run=RunView("Running"))
    )
    assert not decision.submit
    assert not decision.cancel_run_id
    assert decision.status.phase == "Running"
    assert decision.status.attempt == 1
    assert decision.status.observed_generation == 2
    assert decision.events == []


def test_a_new_attempt_of_a_suspended_run_waits_again_unless_still_approved() -> None:
    done = running(phase="Succeeded")
    changed = {"generation": 2, "spec_hash": "b" * 64}
    waiting = plan_training(spec(suspend=True), done, suspended_obs(**changed))
    assert waiting.status.attempt == 2
    assert waiting.status.phase == "Suspended"
    still = plan_training(spec(suspend=True), done, suspended_obs(approved=True, **changed))
    assert still.submit
    assert reasons.APPROVED not in [e[1] for e in still.events]  # nothing was held


def test_a_suspended_spec_that_cannot_compile_fails_at_once() -> None:
    held = plan_training(spec(suspend=True), TrainingRunStatus(), suspended_obs()).status
    broken = suspended_obs(generation=2, spec_hash="", compile_error="spec.resources.cpu: bad")
    decision = plan_training(spec(suspend=True), held, broken)
    assert decision.status.phase == "Failed"
    assert ready(decision.status)[1] == reasons.INVALID_SPEC


def test_the_pipeline_is_compiled_without_suspend() -> None:
    assert pipeline_spec(spec(suspend=True)) == spec()
    assert spec(suspend=True) != spec()
    plain = spec()
    assert pipeline_spec(plain) is plain


def test_only_the_annotation_true_approves() -> None:
    assert is_approved({"kubeloop.dev/approve": "true"})
    for value in ("false", "yes", "", "True "):
        assert not is_approved({"kubeloop.dev/approve": value})
    assert not is_approved({"kubeloop.dev/drift-policy": "true"})
