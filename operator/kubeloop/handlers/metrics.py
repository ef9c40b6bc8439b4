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
