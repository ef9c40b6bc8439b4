"""The operator's own metrics: reconciliations by kind and result, and their latency."""

from __future__ import annotations

import prometheus_client

RECONCILES = prometheus_client.Counter(
    "kubeloop_reconcile_total", "Reconciliations by kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = prometheus_client.Histogram(
    "kubeloop_reconcile_duration_seconds",
    "Reconciliation latency by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
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
