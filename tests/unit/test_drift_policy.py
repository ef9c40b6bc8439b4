"""The DriftPolicy's pure parts: signals over one window, the breach clock, the storm governor,
the retrain it renders, the outcomes it follows (planning/drift_signals, planning/drift_policy)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from kubeloop.api.drift_policy import DriftPolicy
from kubeloop.api.model_version import ModelVersion
from kubeloop.contract.labels import DRIFT_EVIDENCE_ANNOTATION, DRIFT_POLICY_LABEL
from kubeloop.planning import drift_policy as plan
from kubeloop.planning import drift_signals, retrain

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
EDGES = [float(e) for e in range(11)]
UNIFORM = [0.1] * 10 + [0.0]  # ten equal buckets, no missing values


def version(name: str = "fraud-v1", **spec: Any) -> ModelVersion:
    return ModelVersion.model_validate(
        {
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {
                "modelName": "fraud",
                "version": 1,
                "artifact": {"uri": "file:///x/model", "sha256": "0" * 64},
                "metrics": {"accuracy": 0.9},
                "lineage": {"trainingRun": "fraud"},
                "reference": [
                    {"name": f, "edges": EDGES, "fractions": UNIFORM, "rows": 100_000}
                    for f in ("amount", "age", "hour")
                ],
                "predictionReference": {"edges": EDGES, "fractions": UNIFORM, "rows": 100_000},
                **spec,
            },
        }
    )


def policy(*, hold: str = "20s", **spec: Any) -> DriftPolicy:
    body: dict[str, Any] = {
        "metadata": {"name": "fraud-drift", "namespace": "team-a", "uid": "u-1", "generation": 1},
        "spec": {
            "target": {"name": "fraud"},
            "interval": "10s",
            "window": "5m",
            "for": hold,
            "signals": [{"name": "features", "type": "psi", "feature": "*", "threshold": 0.2}],
            "action": {"cooldown": "1h", "maxRetrainsPerDay": 2, "data": "served"},
            **spec,
        },
    }
    return DriftPolicy.parse(body)


BASELINE = drift_signals.Baseline.of(version())
SERVED = retrain.Served(
    stable="fraud-v1", followed_alias="candidate", request_log_uri="file:///r/team-a/log"
)
TEMPLATE = {
    "data": {"uri": "file:///d/train.csv", "target": "label", "split": {"seed": 3}},
    "registration": {"modelName": "fraud", "alias": "candidate"},
    "schedule": "@daily",
}


def counts(shifted: dict[str, float] | None = None, rows: int = 1000) -> dict[str, list[float]]:
    """Served counts per feature: exactly the reference, or one bucket inflated."""
    out = {}
    for f in ("amount", "age", "hour"):
        c = [rows * p for p in UNIFORM]
        if shifted and f in shifted:
            c[0] += rows * shifted[f]
        out[f] = c
    return out


def run(
    pol: DriftPolicy, window: drift_signals.Window | None, at: float, **obs: Any
) -> plan.Decision:
    """One pass at T0 + ``at`` seconds; the status is carried to ``pol`` as the daemon does."""
    results = drift_signals.evaluate(pol.spec.signals, BASELINE, window) if window else None
    observed = plan.Observed(
        T0 + dt.timedelta(seconds=at),
        served=obs.pop("served", SERVED),
        results=results,
        template=obs.pop("template", TEMPLATE),
        **obs,
    )
    decision = plan.plan(pol, observed)
    pol.status = decision.status
    return decision


STABLE = drift_signals.Window(features=counts())
DRIFTED = drift_signals.Window(features=counts({"amount": 1.0}))


def test_a_stable_stream_passes_and_a_shift_names_the_feature() -> None:
    (stable,) = drift_signals.evaluate(policy().spec.signals, BASELINE, STABLE)
    assert stable.outcome == "Pass"
    assert stable.value is not None
    assert stable.value < 1e-9
    (shifted,) = drift_signals.evaluate(policy().spec.signals, BASELINE, DRIFTED)
    assert shifted.outcome == "Breach"
    assert shifted.feature == "amount"
    assert shifted.value is not None
    assert shifted.value > 0.2
    assert next(s.feature for s in shifted.scores) == "amount"


def test_below_the_minimum_count_a_huge_shift_is_inconclusive_and_never_acts() -> None:
    pol = policy(hold="0s")
    few = drift_signals.Window(features=counts({"amount": 2.0}, rows=20))  # 60 rows of 100
    decision = run(pol, few, 0)
    assert pol.status.signals[0].outcome == "Inconclusive"
    assert pol.status.signals[0].value is not None  # recorded, not acted on
    assert pol.status.signals[0].feature == "amount"
    assert decision.create is None
    assert not decision.firing
    assert pol.status.phase == "Watching"


def test_a_breach_acts_only_after_it_held_for_for_then_renders_the_retrain() -> None:
    pol = policy()
    assert run(pol, DRIFTED, 0).create is None
    assert pol.status.phase == "Pending"
    assert run(pol, DRIFTED, 10).create is None
    decision = run(pol, DRIFTED, 20)
    body = decision.create
    assert body is not None
    assert pol.status.phase in ("Retraining",)  # (mypy narrowed it to Pending)
    assert body["metadata"]["name"] == "fraud-drift-retrain-1"
    assert body["metadata"]["labels"] == {DRIFT_POLICY_LABEL: "fraud-drift"}
    owner = body["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("DriftPolicy", "u-1", True)
    spec = body["spec"]
    assert spec["data"]["format"] == "requestLog"
    assert spec["data"]["uri"] == "file:///r/team-a/log"
    # the rows since the breach began: the first breaching evaluation
    assert spec["data"]["since"] == "2026-12-01T12:00:00Z"
    assert spec["data"]["target"] == "label"
    assert spec["data"]["split"] == {"seed": 3}
    assert spec["registration"] == {
        "modelName": "fraud",
        "alias": "candidate",
        "parentVersion": "fraud-v1",
    }
    assert "schedule" not in spec
    assert spec["suspend"] is False
    evidence = json.loads(body["metadata"]["annotations"][DRIFT_EVIDENCE_ANNOTATION])
    assert evidence["baselineVersion"] == "fraud-v1"
    assert evidence["signals"][0]["feature"] == "amount"
    assert evidence["topFeatures"][0]["feature"] == "amount"
    assert [r.training_run for r in pol.status.retrains] == ["fraud-drift-retrain-1"]
    assert pol.status.active_training_run == "fraud-drift-retrain-1"
    assert ("Normal", "RetrainStarted") in [(t, r) for t, r, _ in decision.events]


def test_a_flapping_signal_never_holds_for_for() -> None:
    pol = policy()
    for i in range(40):
        decision = run(pol, DRIFTED if i % 2 == 0 else STABLE, 10 * i)
        assert decision.create is None
    assert pol.status.retrain_count == 0
    assert len(pol.status.history) == plan.HISTORY


def test_an_inconclusive_window_neither_resets_nor_advances_the_clock() -> None:
    pol = policy()
    run(pol, DRIFTED, 0)
    silent = drift_signals.Window(problem="Prometheus unavailable: refused")
    assert run(pol, silent, 10).create is None  # the latest evaluation must breach
    assert pol.status.breaching_since == "2026-12-01T12:00:00Z"
    assert run(pol, DRIFTED, 20).create is not None


def test_one_in_flight_then_cooldown_then_the_daily_cap() -> None:
    pol = policy(hold="0s", action={"cooldown": "60s", "maxRetrainsPerDay": 2})
    first = run(pol, DRIFTED, 0).create
    assert first is not None
    child = retrain.Child(first["metadata"]["name"], "Running")
    assert run(pol, DRIFTED, 10, children={child.name: child}).create is None  # in flight
    failed = retrain.Child(child.name, "Failed", gates_failed=True, message="accuracy 0.6 < 0.75")
    decision = run(pol, DRIFTED, 20, children={child.name: failed})
    assert pol.status.retrains[0].outcome == "GatesFailed"
    assert decision.create is None
    assert pol.status.phase == "Cooldown"
    assert "RetrainHeld" in [r for _, r, _ in decision.events]
    second = run(pol, DRIFTED, 70, children={child.name: failed}).create
    assert second is not None
    assert second["metadata"]["name"] == "fraud-drift-retrain-2"
    done = {
        child.name: failed,
        "fraud-drift-retrain-2": retrain.Child("fraud-drift-retrain-2", "Failed", message="boom"),
    }
    assert run(pol, DRIFTED, 80, children=done).create is None
    assert pol.status.retrains[1].outcome == "Failed"
    capped = run(pol, DRIFTED, 200, children=done)
    assert capped.create is None
    assert "daily cap" in pol.status.conditions[0].message
    assert run(pol, DRIFTED, 86_500, children=done).create is not None  # a day later


def test_a_restart_after_creating_adopts_the_child_instead_of_creating_another() -> None:
    pol = policy(hold="0s")
    before = pol.status.model_copy(deep=True)
    created = run(pol, DRIFTED, 0).create
    assert created is not None
    pol.status = before  # the status write was lost: the operator died right after creating
    child = retrain.Child("fraud-drift-retrain-1", "Running")
    decision = run(pol, DRIFTED, 10, children={child.name: child})
    assert decision.create is None
    assert [r.training_run for r in pol.status.retrains] == ["fraud-drift-retrain-1"]
    assert pol.status.retrain_count == 1


def test_the_outcome_follows_the_version_through_its_rollout_and_rebaselines() -> None:
    pol = policy(hold="0s")
    run(pol, DRIFTED, 0)
    ok = retrain.Child("fraud-drift-retrain-1", "Succeeded", model_version="fraud-v2")
    children = {ok.name: ok}
    run(pol, STABLE, 10, children=children)
    assert pol.status.retrains[0].outcome == "RollingOut"
    assert pol.status.retrains[0].model_version == "fraud-v2"
    promoted = retrain.Served(
        stable="fraud-v2",
        rollouts={"fraud-v2": "Promoted"},
        followed_alias="candidate",
        request_log_uri="x",
    )
    decision = run(pol, None, 12, children=children, served=promoted)
    assert pol.status.retrains[0].outcome in ("Promoted",)
    assert pol.status.baseline_version == "fraud-v2"
    assert pol.status.breaching_since == ""
    reasons = [r for _, r, _ in decision.events]
    assert "RetrainFinished" in reasons
    assert "Rebaselined" in reasons
    assert pol.status.active_training_run == ""


def test_rolled_back_and_vanished_retrains_are_final() -> None:
    served = retrain.Served(stable="fraud-v1", rollouts={"fraud-v2": "RolledBack"})
    child = retrain.Child("r", "Succeeded", model_version="fraud-v2")
    assert retrain.outcome_of(child, served)[0] == "RolledBack"
    assert retrain.outcome_of(None, served)[0] == "Failed"
    assert retrain.outcome_of(retrain.Child("r", "Suspended"), served)[0] == "AwaitingApproval"


def test_dry_run_renders_and_creates_nothing() -> None:
    pol = policy(hold="0s", action={"dryRun": True, "data": "both"})
    decision = run(pol, DRIFTED, 0)
    assert decision.create is None
    assert pol.status.retrains == []
    rendered = json.loads(pol.status.dry_run_training_run)
    assert rendered["metadata"]["name"] == "fraud-drift-retrain-1"
    data = rendered["spec"]["data"]
    assert data["uri"] == "file:///d/train.csv"  # both: the template's data, plus the log
    assert data["extra"][0]["format"] == "requestLog"
    assert "DryRun" in [r for _, r, _ in decision.events]


def test_manual_approval_creates_the_run_suspended() -> None:
    pol = policy(hold="0s", action={"approval": "manual"})
    body = run(pol, DRIFTED, 0).create
    assert body is not None
    assert body["spec"]["suspend"] is True
    assert pol.status.phase == "AwaitingApproval"


def test_observe_and_notify_modes_never_create() -> None:
    for mode in ("observe", "notify"):
        pol = policy(hold="0s", action={"mode": mode})
        decision = run(pol, DRIFTED, 0)
        assert decision.create is None
        assert decision.firing
        events = [r for _, r, _ in decision.events]
        assert ("DriftDetected" in events) == (mode == "notify")


def test_suspended_evaluates_but_does_not_act() -> None:
    pol = policy(hold="0s", suspend=True)
    assert run(pol, DRIFTED, 0).create is None
    assert pol.status.phase == "Suspended"
    assert pol.status.signals[0].outcome == "Breach"


def test_a_missing_template_is_refused_naming_the_field() -> None:
    pol = policy(hold="0s")
    decision = run(
        pol, DRIFTED, 0, template=None, template_problem="spec.action.template.name=x: gone"
    )
    ready = pol.status.conditions[0]
    assert decision.create is None
    assert ready.status == "False"
    assert ready.reason == "TemplateNotFound"
    assert "spec.action.template" in ready.message


def test_share_of_drifted_features() -> None:
    signals = policy(
        signals=[{"name": "s", "type": "psi", "feature": "*", "share": 0.5, "threshold": 0.2}]
    ).spec.signals
    (one,) = drift_signals.evaluate(signals, BASELINE, DRIFTED)
    assert one.outcome == "Pass"
    assert one.value == pytest.approx(1 / 3)
    two = drift_signals.Window(features=counts({"amount": 1.0, "age": 1.0}))
    (both,) = drift_signals.evaluate(signals, BASELINE, two)
    assert both.outcome == "Breach"


def test_auto_thresholds_and_concept_signals() -> None:
    signals = policy(
        signals=[
            {"name": "f", "type": "js", "feature": "amount", "threshold": "auto"},
            {"name": "acc", "type": "accuracy", "threshold": "auto"},
            {"name": "p", "type": "prediction", "threshold": 0.1},
        ]
    ).spec.signals
    window = drift_signals.Window(
        features=counts(),
        predictions=[100.0] * 10 + [0.0],
        concept={"accuracy": (0.86, 400.0)},
    )
    f, acc, p = drift_signals.evaluate(signals, BASELINE, window)
    assert f.outcome == "Pass"
    assert f.threshold is not None
    assert 0 < f.threshold < 0.2
    # 0.9 evaluated; at 400 labelled rows sampling explains ~0.035 (z=2.33): 0.86 breaches
    assert acc.threshold == pytest.approx(0.9 - 2.3263 * (0.09 / 400) ** 0.5, abs=1e-3)
    assert acc.outcome == "Breach"
    assert acc.below
    assert p.outcome == "Pass"
    few = drift_signals.Window(features=counts(), concept={"accuracy": (0.1, 10.0)})
    assert drift_signals.evaluate(signals, BASELINE, few)[1].outcome == "Inconclusive"


def test_spec_problems_name_the_field() -> None:
    signals = policy(
        signals=[
            {"name": "a", "type": "psi", "feature": "nope", "threshold": 0.2},
            {"name": "b", "type": "mae", "threshold": 3},
        ]
    ).spec.signals
    problems = drift_signals.problems(signals, BASELINE)
    assert problems[0][0] == "InvalidSpec"
    assert problems[0][1].startswith("spec.signals[0].feature='nope'")
    assert problems[1][1].startswith("spec.signals[1].type=mae needs a regressor")
    bare = drift_signals.Baseline.of(version(reference=[], predictionReference=None))
    reason, message = drift_signals.problems(signals, bare)[0]
    assert reason == "NoReference"
    assert "no feature reference" in message


@pytest.mark.parametrize(
    ("signal", "message"),
    [
        ({"type": "psi", "feature": "*", "threshold": -0.1}, "expected a number >= 0"),
        ({"type": "accuracy", "threshold": 1.5}, "lies in 0..1"),
        ({"type": "mae", "threshold": "auto"}, "not available for mae"),
        ({"type": "psi", "feature": "*", "threshold": "often"}, "threshold"),
    ],
)
def test_thresholds_the_schema_cannot_check_are_refused_by_the_model(
    signal: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        policy(signals=[{"name": "s", **signal}])


def test_between_evaluations_the_last_word_stands() -> None:
    pol = policy(hold="0s", action={"cooldown": "1h"})
    run(pol, DRIFTED, 0)
    failed = {"fraud-drift-retrain-1": retrain.Child("fraud-drift-retrain-1", "Failed")}
    run(pol, DRIFTED, 10, children=failed)
    assert pol.status.phase == "Cooldown"
    ready = pol.status.conditions[0]
    for at in (11, 12, 13):  # passes with nothing measured (results=None)
        assert run(pol, None, at, children=failed).create is None
        assert pol.status.phase == "Cooldown"
        assert pol.status.conditions[0] == ready


def test_an_unreachable_prometheus_is_ready_false_and_never_acts() -> None:
    pol = policy(hold="0s")
    window = drift_signals.Window(problem="Prometheus unavailable: connection refused")
    decision = run(pol, window, 0, unavailable=window.problem)
    ready = pol.status.conditions[0]
    assert (ready.status, ready.reason) == ("False", "PrometheusUnavailable")
    assert decision.create is None
    assert {s.outcome for s in pol.status.signals} == {"Inconclusive"}


def test_a_missing_template_is_reported_before_any_breach() -> None:
    pol = policy()
    run(pol, STABLE, 0, template=None, template_problem="spec.action.template.name=x: none")
    ready = pol.status.conditions[0]
    assert (ready.status, ready.reason) == ("False", "TemplateNotFound")
    run(pol, None, 2, template=None, template_problem="spec.action.template.name=x: none")
    assert pol.status.conditions[0].reason == "TemplateNotFound"  # stays between evaluations


def test_acting_at_once_takes_the_rows_that_first_breached() -> None:
    pol = policy(hold="0s")
    body = run(pol, DRIFTED, 0).create
    assert body is not None
    # for 0s: the breach began at this very evaluation; its rows are the interval before it
    assert body["spec"]["data"]["since"] == "2026-12-01T11:59:50Z"


def test_children_trimmed_from_the_record_are_not_adopted_again() -> None:
    pol = policy()
    pol.status.retrain_count = 40  # the record keeps the newest 30; older children still exist
    old = {"fraud-drift-retrain-1": retrain.Child("fraud-drift-retrain-1", "Succeeded")}
    run(pol, STABLE, 0, children=old)
    assert pol.status.retrains == []
    assert pol.status.retrain_count == 40


def test_the_retrain_counter_exists_before_the_first_retrain() -> None:
    # An alert on increase(kubeloop_retrains_total[10m]) sees the first retrain only if the
    # series was there at 0 before it.
    from prometheus_client import REGISTRY

    from kubeloop.handlers.drift_policy import _export

    p = policy()
    labels = {"namespace": p.namespace, "policy": p.name}
    _export(p, plan.Decision(p.status))
    assert REGISTRY.get_sample_value("kubeloop_retrains_total", labels) is not None
