"""The operator's own metrics: reconciliations by kind and result and their latency, and the
state of every resource it reconciles (what the dashboard and the alert rules read).

State gauges are exported from the live body after every daemon pass and dropped when the
daemon stops (the resource was deleted, or this replica paused in favour of its peer), so only
the active replica exports a resource and a sum over replicas counts it once. Counters of
transitions (rollouts finished, retrain outcomes) are counted where the daemon writes the
status that records them, and exist at 0 from a resource's first pass so that ``increase()``
sees their first step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import prometheus_client

from kubeloop.api.drift_policy import RetrainAction

RECONCILES = prometheus_client.Counter(
    "kubeloop_reconcile_total", "Reconciliations by kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = prometheus_client.Histogram(
    "kubeloop_reconcile_duration_seconds",
    "Reconciliation latency by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

DAEMONS = prometheus_client.Gauge(
    "kubeloop_daemons",
    "Resources this replica reconciles now, by kind (0 on a standby replica).",
    ["kind"],
)

# DriftPolicy: what an alert rule on the loop needs (mode notify and retrain).
DRIFT_FIRING = prometheus_client.Gauge(
    "kubeloop_drift_breached",
    "1 while a DriftPolicy's breach has held for its `for` duration, else 0.",
    ["namespace", "policy"],
)
DRIFT_SIGNAL = prometheus_client.Gauge(
    "kubeloop_drift_signal_value",
    "Latest value of each DriftPolicy signal (absent while inconclusive).",
    ["namespace", "policy", "signal"],
)
DRIFT_THRESHOLD = prometheus_client.Gauge(
    "kubeloop_drift_signal_threshold",
    "The threshold each DriftPolicy signal was last held to.",
    ["namespace", "policy", "signal"],
)
RETRAINS = prometheus_client.Counter(
    "kubeloop_retrains_total",
    "Retraining TrainingRuns created by DriftPolicies.",
    ["namespace", "policy"],
)
RETRAIN_OUTCOMES = prometheus_client.Counter(
    "kubeloop_retrain_outcomes_total",
    "Retrains that reached an outcome (Promoted, RolledBack, GatesFailed, Failed).",
    ["namespace", "policy", "outcome"],
)
RETRAINS_TODAY = prometheus_client.Gauge(
    "kubeloop_retrains_today",
    "Retrains a DriftPolicy started in the last 24 h.",
    ["namespace", "policy"],
)
RETRAINS_DAILY_CAP = prometheus_client.Gauge(
    "kubeloop_retrains_daily_cap",
    "A DriftPolicy's spec.action.maxRetrainsPerDay.",
    ["namespace", "policy"],
)
POLICY_PHASE = prometheus_client.Gauge(
    "kubeloop_drift_policy_phase",
    "1 for the phase each DriftPolicy is in.",
    ["namespace", "policy", "phase"],
)

# ModelDeployment: the rollout.
ROLLOUT_PHASE = prometheus_client.Gauge(
    "kubeloop_rollout_phase",
    "1 for the phase each ModelDeployment is in.",
    ["namespace", "deployment", "phase"],
)
CANARY_WEIGHT = prometheus_client.Gauge(
    "kubeloop_rollout_canary_weight_percent",
    "Percent of a ModelDeployment's traffic its canary receives (0 without a canary).",
    ["namespace", "deployment"],
)
ROLLOUTS = prometheus_client.Counter(
    "kubeloop_rollouts_total",
    "Rollouts that finished, by result (Promoted, RolledBack, Aborted, Superseded).",
    ["namespace", "deployment", "result"],
)

# TrainingRun.
TRAINING_PHASE = prometheus_client.Gauge(
    "kubeloop_training_run_phase",
    "1 for the phase each TrainingRun is in.",
    ["namespace", "training_run", "phase"],
)
TRAINING_GPUS = prometheus_client.Gauge(
    "kubeloop_training_run_gpus",
    "GPUs a TrainingRun requests, by state: running (held) or queued (waiting for budget).",
    ["namespace", "training_run", "state"],
)

DEFAULT_DAILY_CAP = RetrainAction.model_fields["max_retrains_per_day"].default
RETRAIN_ENDS = ("Promoted", "RolledBack", "GatesFailed", "Failed")
ROLLOUT_RESULTS = ("Promoted", "RolledBack", "Aborted", "Superseded")

# The series a resource's state puts out, by kind: (metric, the label naming the resource).
_STATE: dict[str, tuple[tuple[Any, str], ...]] = {
    "TrainingRun": ((TRAINING_PHASE, "training_run"), (TRAINING_GPUS, "training_run")),
    "ModelDeployment": (
        (ROLLOUT_PHASE, "deployment"),
        (CANARY_WEIGHT, "deployment"),
        (ROLLOUTS, "deployment"),
    ),
    "DriftPolicy": (
        (POLICY_PHASE, "policy"),
        (RETRAINS, "policy"),
        (RETRAIN_OUTCOMES, "policy"),
        (RETRAINS_TODAY, "policy"),
        (RETRAINS_DAILY_CAP, "policy"),
        (DRIFT_FIRING, "policy"),
        (DRIFT_SIGNAL, "policy"),
        (DRIFT_THRESHOLD, "policy"),
    ),
}


# The phase each resource's gauge shows now: a pass that finds it unchanged touches nothing
# (removing by labels scans every series of the gauge, and every daemon passes each 2 s).
_SHOWN: dict[tuple[str, str, str], str] = {}


def _phase(gauge: prometheus_client.Gauge, label: str, ns: str, name: str, phase: str) -> None:
    """One series at 1 for the current phase; the previous phase's series goes."""
    key = (label, ns, name)
    if _SHOWN.get(key) == phase:
        return
    previous = _SHOWN.pop(key, "")
    if previous:
        gauge.remove(ns, name, previous)
    if phase:
        gauge.labels(ns, name, phase).set(1)
        _SHOWN[key] = phase


def export_state(kind: str, body: Mapping[str, Any]) -> None:
    """Set the state gauges of one resource from its live body (spec and status)."""
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    spec, status = body.get("spec") or {}, body.get("status") or {}
    phase = str(status.get("phase") or "")
    if kind == "TrainingRun":
        _phase(TRAINING_PHASE, "training_run", ns, name, phase)
        gpus = int((spec.get("resources") or {}).get("gpu") or 0)
        for state, phases in (("running", {"Running"}), ("queued", {"Queued", "Pending"})):
            TRAINING_GPUS.labels(ns, name, state).set(gpus if phase in phases else 0)
    elif kind == "ModelDeployment":
        _phase(ROLLOUT_PHASE, "deployment", ns, name, phase)
        canary = status.get("canary") or {}
        CANARY_WEIGHT.labels(ns, name).set(int(canary.get("weight") or 0))
        for result in ROLLOUT_RESULTS:
            ROLLOUTS.labels(ns, name, result)
    elif kind == "DriftPolicy":
        _phase(POLICY_PHASE, "policy", ns, name, phase)
        RETRAINS_TODAY.labels(ns, name).set(int(status.get("retrainsToday") or 0))
        cap = (spec.get("action") or {}).get("maxRetrainsPerDay", DEFAULT_DAILY_CAP)
        RETRAINS_DAILY_CAP.labels(ns, name).set(int(cap))
        for outcome in RETRAIN_ENDS:
            RETRAIN_OUTCOMES.labels(ns, name, outcome)


def count_transitions(
    kind: str, ns: str, name: str, old: Mapping[str, Any], new: Mapping[str, Any]
) -> None:
    """Count what ``new`` (the status about to be written) finished that ``old`` had not."""
    if kind == "ModelDeployment":
        seen = {_key(r) for r in old.get("history") or []}
        for record in new.get("history") or []:
            if _key(record) not in seen and record.get("result") in ROLLOUT_RESULTS:
                ROLLOUTS.labels(ns, name, record["result"]).inc()
    elif kind == "DriftPolicy":
        before = {r.get("trainingRun"): r.get("outcome") for r in old.get("retrains") or []}
        for record in new.get("retrains") or []:
            outcome = record.get("outcome")
            if outcome in RETRAIN_ENDS and before.get(record.get("trainingRun")) != outcome:
                RETRAIN_OUTCOMES.labels(ns, name, outcome).inc()


def _key(record: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(record.get(k, "")) for k in ("toVersion", "result", "finishedAt"))


def forget(kind: str, body: Mapping[str, Any]) -> None:
    """Drop every state series of one resource (its daemon stopped)."""
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    for metric, label in _STATE.get(kind, ()):
        metric.remove_by_labels({"namespace": ns, label: name})
        _SHOWN.pop((label, ns, name), None)
