"""The serving runtime's Prometheus series: names and labels, shared by the runtime that
exports them and the queries (canary analysis, drift) that read them.

Every series carries ``namespace`` (added by the scrape configuration), ``model`` (the
deployment) and ``version`` (the ModelVersion), so a canary and its stable version are told
apart by label.

Labelled outcomes (``serving/feedback.py``) count rows, never requests: a request of n rows is
n predictions, each labelled on its own (``row``). The request log (``serving/request_log.py``)
counts rows too, by ``stream``: ``predictions`` or ``labels``.
"""

from __future__ import annotations

from typing import Final

REQUESTS: Final = "kubeloop_requests"  # a Counter: Prometheus exposes kubeloop_requests_total
REQUEST_DURATION: Final = "kubeloop_request_duration_seconds"
FEATURE_BUCKETS: Final = "kubeloop_feature_bucket"
PREDICTION_BUCKETS: Final = "kubeloop_prediction_bucket"

# --- label feedback (Counters unless said otherwise) -----------------------------------------
# Predicted rows a label can be fed back for (every answered row).
FEEDBACK_PREDICTIONS: Final = "kubeloop_feedback_predictions"
# Labels fed back, by ``outcome`` (FEEDBACK_OUTCOMES); one a row.
FEEDBACK_LABELS: Final = "kubeloop_feedback_labels"
# A Gauge: predicted rows still waiting for their label.
FEEDBACK_PENDING: Final = "kubeloop_feedback_pending"
# Unlabelled rows given up on, by ``reason`` (FEEDBACK_EVICTION_REASONS).
FEEDBACK_EVICTIONS: Final = "kubeloop_feedback_evictions"
# Classification: labelled rows by ``actual`` and ``predicted`` class name, and ``correct``
# ("true" where the two agree, so accuracy needs no label comparison in PromQL).
FEEDBACK_CONFUSION: Final = "kubeloop_feedback_confusion"
# Regression: a Histogram of |prediction - label| (``_sum`` / ``_count`` is the MAE) and a
# Counter of the squared errors (RMSE).
FEEDBACK_ABSOLUTE_ERROR: Final = "kubeloop_feedback_absolute_error"
FEEDBACK_SQUARED_ERROR: Final = "kubeloop_feedback_squared_error"
# A Histogram: seconds from the prediction to its label.
FEEDBACK_LABEL_DELAY: Final = "kubeloop_feedback_label_delay_seconds"

# --- the request log --------------------------------------------------------------------------
# Rows written to the log's Parquet files, by ``stream``.
REQUEST_LOG_ROWS: Final = "kubeloop_request_log_rows"
# Rows not written, by ``stream`` and ``reason`` (REQUEST_LOG_DROP_REASONS).
REQUEST_LOG_DROPS: Final = "kubeloop_request_log_dropped_rows"

MISSING: Final = "missing"  # the ``bucket`` label of a missing value

MODEL_LABEL: Final = "model"
VERSION_LABEL: Final = "version"
CODE_LABEL: Final = "code"
FEATURE_LABEL: Final = "feature"
BUCKET_LABEL: Final = "bucket"
OUTCOME_LABEL: Final = "outcome"
REASON_LABEL: Final = "reason"
ACTUAL_LABEL: Final = "actual"
PREDICTED_LABEL: Final = "predicted"
CORRECT_LABEL: Final = "correct"
STREAM_LABEL: Final = "stream"

# matched: joined to its prediction; duplicate: that row was already labelled with this value
# (counted once); conflict: already labelled with another value (the first stays); late: the
# prediction's TTL had passed (or it was evicted); unknown: no prediction has that id;
# invalid: the body, the id, the row or the label is malformed.
FEEDBACK_OUTCOMES: Final = ("matched", "duplicate", "conflict", "late", "unknown", "invalid")
# expired: the TTL passed without a label; capacity: pushed out by newer predictions.
FEEDBACK_EVICTION_REASONS: Final = ("expired", "capacity")
REQUEST_LOG_STREAMS: Final = ("predictions", "labels")
# sampled_out and over_cap are by configuration (the sample rate, the rows-per-second cap);
# queue_full (the writer is behind), write_failed (the store refused) and closed (recorded
# after shutdown began) are losses.
REQUEST_LOG_DROP_REASONS: Final = (
    "sampled_out",
    "over_cap",
    "queue_full",
    "write_failed",
    "closed",
)


def total(counter: str) -> str:
    """The exposed sample name of a prometheus_client Counter."""
    return f"{counter}_total"


def bucket_labels(buckets: int) -> list[str]:
    """The ``bucket`` label of every bucket index: "0" .. "B-1", then "missing"."""
    return [*(str(b) for b in range(buckets)), MISSING]
