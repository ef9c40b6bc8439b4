"""The state series the operator exports for the dashboard and the alerts: one phase at a time,
gone when the daemon stops, and transition counters that count what a pass finished once."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from kubeloop.handlers import metrics


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def body(kind_spec: dict[str, Any], status: dict[str, Any], name: str = "r1") -> dict[str, Any]:
    return {"metadata": {"namespace": "team-m", "name": name}, "spec": kind_spec, "status": status}


def test_a_training_run_shows_one_phase_and_its_gpus_by_state() -> None:
    spec = {"resources": {"gpu": 2}}
    metrics.export_state("TrainingRun", body(spec, {"phase": "Queued"}))
    labels = {"namespace": "team-m", "training_run": "r1"}
    assert value("kubeloop_training_run_phase", **labels, phase="Queued") == 1
    assert value("kubeloop_training_run_gpus", **labels, state="queued") == 2
    assert value("kubeloop_training_run_gpus", **labels, state="running") == 0
    metrics.export_state("TrainingRun", body(spec, {"phase": "Running"}))
    assert value("kubeloop_training_run_phase", **labels, phase="Queued") is None
    assert value("kubeloop_training_run_phase", **labels, phase="Running") == 1
    assert value("kubeloop_training_run_gpus", **labels, state="running") == 2
    assert value("kubeloop_training_run_gpus", **labels, state="queued") == 0
    metrics.export_state("TrainingRun", body(spec, {"phase": "Failed"}))
    assert value("kubeloop_training_run_gpus", **labels, state="running") == 0
    metrics.forget("TrainingRun", body(spec, {}))
    assert value("kubeloop_training_run_phase", **labels, phase="Failed") is None
    assert value("kubeloop_training_run_gpus", **labels, state="running") is None


def test_a_deployment_shows_its_canary_weight_and_counts_each_finished_rollout_once() -> None:
    labels = {"namespace": "team-m", "deployment": "d1"}
    status = {"phase": "Progressing", "canary": {"modelVersion": "m-v2", "weight": 25}}
    metrics.export_state("ModelDeployment", body({}, status, "d1"))
    assert value("kubeloop_rollout_canary_weight_percent", **labels) == 25
    assert value("kubeloop_rollout_phase", **labels, phase="Progressing") == 1
    # Every result exists at 0 before the first rollout ends (increase() sees the first).
    assert value("kubeloop_rollouts_total", **labels, result="RolledBack") == 0
    old = {"history": [{"toVersion": "m-v1", "result": "Promoted", "finishedAt": "t1"}]}
    new = {
        "history": [
            *old["history"],
            {"toVersion": "m-v2", "result": "RolledBack", "finishedAt": "t2"},
        ]
    }
    metrics.count_transitions("ModelDeployment", "team-m", "d1", old, new)
    metrics.count_transitions("ModelDeployment", "team-m", "d1", new, new)  # the next pass
    assert value("kubeloop_rollouts_total", **labels, result="RolledBack") == 1
    assert value("kubeloop_rollouts_total", **labels, result="Promoted") == 0
    metrics.forget("ModelDeployment", body({}, {}, "d1"))
    assert value("kubeloop_rollout_canary_weight_percent", **labels) is None
    assert value("kubeloop_rollouts_total", **labels, result="RolledBack") is None


def test_a_policy_shows_its_cap_and_counts_retrain_outcomes_when_they_change() -> None:
    labels = {"namespace": "team-m", "policy": "p1"}
    spec = {"action": {"maxRetrainsPerDay": 2}}
    metrics.export_state("DriftPolicy", body(spec, {"phase": "Cooldown", "retrainsToday": 2}, "p1"))
    assert value("kubeloop_retrains_today", **labels) == 2
    assert value("kubeloop_retrains_daily_cap", **labels) == 2
    assert value("kubeloop_drift_policy_phase", **labels, phase="Cooldown") == 1
    assert value("kubeloop_retrain_outcomes_total", **labels, outcome="Failed") == 0
    training = {"retrains": [{"trainingRun": "p1-retrain-1", "outcome": "Training"}]}
    failed = {"retrains": [{"trainingRun": "p1-retrain-1", "outcome": "GatesFailed"}]}
    metrics.count_transitions("DriftPolicy", "team-m", "p1", training, failed)
    metrics.count_transitions("DriftPolicy", "team-m", "p1", failed, failed)
    assert value("kubeloop_retrain_outcomes_total", **labels, outcome="GatesFailed") == 1
    metrics.DRIFT_SIGNAL.labels("team-m", "p1", "features").set(0.3)
    metrics.forget("DriftPolicy", body(spec, {}, "p1"))
    assert value("kubeloop_drift_signal_value", **labels, signal="features") is None
    assert value("kubeloop_retrains_daily_cap", **labels) is None
    assert value("kubeloop_retrain_outcomes_total", **labels, outcome="GatesFailed") is None


def test_forgetting_one_resource_keeps_its_neighbours() -> None:
    metrics.export_state("TrainingRun", body({}, {"phase": "Running"}, "keep"))
    metrics.export_state("TrainingRun", body({}, {"phase": "Running"}, "drop"))
    metrics.forget("TrainingRun", body({}, {}, "drop"))
    keep = {"namespace": "team-m", "training_run": "keep", "phase": "Running"}
    assert value("kubeloop_training_run_phase", **keep) == 1
    metrics.forget("TrainingRun", body({}, {}, "keep"))
