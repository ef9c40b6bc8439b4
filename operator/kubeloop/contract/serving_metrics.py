"""The serving runtime's Prometheus series: names and labels, shared by the runtime that
exports them and the queries (canary analysis, drift) that read them.

Every series carries ``namespace`` (added by the scrape configuration), ``model`` (the
deployment) and ``version`` (the ModelVersion), so a canary and its stable version are told
apart by label.
"""

from __future__ import annotations

from typing import Final

REQUESTS: Final = "kubeloop_requests"  # a Counter: Prometheus exposes kubeloop_requests_total
REQUEST_DURATION: Final = "kubeloop_request_duration_seconds"
FEATURE_BUCKETS: Final = "kubeloop_feature_bucket"
PREDICTION_BUCKETS: Final = "kubeloop_prediction_bucket"

MODEL_LABEL: Final = "model"
VERSION_LABEL: Final = "version"
CODE_LABEL: Final = "code"
FEATURE_LABEL: Final = "feature"
BUCKET_LABEL: Final = "bucket"


def total(counter: str) -> str:
    """The exposed sample name of a prometheus_client Counter."""
    return f"{counter}_total"
