"""The runtime's Prometheus metrics, in prometheus_client's default registry (which the
runtime's ``/metrics`` serves). Their names and labels are :mod:`kubeloop.contract.serving_metrics`,
which the operator's queries read too. Every series carries ``model`` (the deployment) and
``version`` (the ModelVersion), so a canary and its stable version are told apart by label.

The feature and prediction histograms count into the reference's buckets with its rule
(:mod:`kubeloop.contract.reference`): a missing value (NaN) in the ``missing`` bucket, never in
bucket 0; text and image models count their summary features, not token positions or pixels;
predictions on edges shared by every version of the model, so stable and canary compare the
same score ranges.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from kubeloop.contract import serving_metrics as contract
from kubeloop.contract.reference import (
    CLASSIFIER_EDGES,
    bucket_index,
    input_summary,
    n_buckets,
    prediction_score,
    summary_features,
)
from kubeloop.contract.serving_metrics import bucket_labels

REQUESTS = Counter(
    contract.REQUESTS,
    "Prediction requests by HTTP-like status code (200, 400, 500).",
    [contract.MODEL_LABEL, contract.VERSION_LABEL, contract.CODE_LABEL],
)
REQUEST_DURATION = Histogram(
    contract.REQUEST_DURATION,
    "Time to answer a prediction request, from parsed body to response.",
    [contract.MODEL_LABEL, contract.VERSION_LABEL],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
FEATURE_DOC = (
    "Request rows by feature and the reference (training) quantile bucket of the raw value "
    "('missing' for NaN); text and image models: summary features (sequence_length, oov_rate; "
    "brightness, contrast)."
)
PREDICTION_DOC = (
    "Predictions by the bucket of their score (positive-class probability for binary "
    "classification, top-class probability for more classes, the value for regression) on "
    "edges shared by every version of the model ('missing' for NaN)."
)


class _HistogramCounters:
    """The feature and prediction bucket counters of every served version, kept as numpy
    arrays and exported as Prometheus counters when scraped: a request adds one ``bincount``
    instead of taking a lock per bucket it touches (the runtime answers and is scraped on one
    event loop, so nothing races)."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], ServingMetrics] = {}

    def add(self, metrics: ServingMetrics) -> None:
        """Export ``metrics``' buckets; a second ServingMetrics of the same model and version
        with the same buckets shares the first one's counts, as prometheus_client's label
        children would."""
        key = (metrics.model, metrics.version)
        known = self._versions.get(key)
        if (
            known is not None
            and known.feature_labels == metrics.feature_labels
            and known.prediction_labels == metrics.prediction_labels
        ):
            metrics.feature_counts = known.feature_counts
            metrics.prediction_counts = known.prediction_counts
        self._versions[key] = metrics

    def collect(self) -> Iterator[Metric]:
        features = CounterMetricFamily(
            contract.FEATURE_BUCKETS,
            FEATURE_DOC,
            labels=[
                contract.MODEL_LABEL,
                contract.VERSION_LABEL,
                contract.FEATURE_LABEL,
                contract.BUCKET_LABEL,
            ],
        )
        predictions = CounterMetricFamily(
            contract.PREDICTION_BUCKETS,
            PREDICTION_DOC,
            labels=[contract.MODEL_LABEL, contract.VERSION_LABEL, contract.BUCKET_LABEL],
        )
        for m in self._versions.values():
            for (feature, bucket), value in zip(
                m.feature_labels, m.feature_counts.tolist(), strict=True
            ):
                features.add_metric([m.model, m.version, feature, bucket], value)
            for bucket, value in zip(
                m.prediction_labels, m.prediction_counts.tolist(), strict=True
            ):
                predictions.add_metric([m.model, m.version, bucket], value)
        yield features
        yield predictions


HISTOGRAMS = _HistogramCounters()
REGISTRY.register(HISTOGRAMS)


class ServingMetrics:
    """The metrics of one served version: request counters with label children resolved once,
    histogram buckets as arrays (``HISTOGRAMS`` exports them), every bucket from the start at
    zero.

    ``prediction_edges``: the edges every version of the model shares (the operator passes the
    first version's for regression); empty = the artifact's own reference edges, or the fixed
    score edges for a classifier.
    """

    def __init__(
        self,
        model: str,
        version: str,
        *,
        task: str,
        reference: dict[str, Any],
        prediction_edges: Sequence[float] = (),
    ) -> None:
        self.model, self.version, self.task = model, version, task
        self._duration = REQUEST_DURATION.labels(model, version)
        self._codes = {
            code: REQUESTS.labels(model, version, code) for code in ("200", "400", "500")
        }
        features: dict[str, Any] = reference.get("features") or {}
        self.summary: dict[str, Any] | None = reference.get("summary") or None
        self.feature_names = list(features)
        if self.summary is not None and list(summary_features(self.summary)) != self.feature_names:
            raise ValueError(
                f"reference.summary {self.summary!r} describes the features "
                f"{list(summary_features(self.summary))}, but the reference has "
                f"{self.feature_names}"
            )
        # Edges of all features in one matrix, padded with +inf (never <= a value), so one
        # comparison finds every feature's bucket: bucket = (#edges <= value) - 1, clipped.
        edges = [np.asarray(ref["edges"], dtype=np.float64) for ref in features.values()]
        width = max((len(e) for e in edges), default=0)
        self._edges = np.full((len(edges), width), np.inf)
        for i, e in enumerate(edges):
            self._edges[i, : len(e)] = e
        self._n_buckets = np.asarray([n_buckets(e) for e in edges], dtype=np.intp)
        # One flat list of counters: feature i's bucket b is at offsets[i] + b, its missing
        # bucket at offsets[i] + n_buckets[i].
        self._offsets = np.concatenate([[0], np.cumsum(self._n_buckets + 1)[:-1]]).astype(np.intp)
        self.feature_labels: list[tuple[str, str]] = [
            (name, label)
            for name, n in zip(features, self._n_buckets, strict=True)
            for label in bucket_labels(int(n))
        ]
        self.feature_counts = np.zeros(len(self.feature_labels), dtype=np.int64)
        # Classifiers: fixed score edges (whatever an older artifact says); regression: the
        # edges shared by the model's versions, else the artifact's own (none: no histogram).
        own = (reference.get("prediction") or {}).get("edges") or []
        score_edges = list(prediction_edges) or (
            list(CLASSIFIER_EDGES) if task == "classification" else [float(e) for e in own]
        )
        self.prediction_edges = np.asarray(
            score_edges if len(score_edges) >= 2 else [], dtype=np.float64
        )
        self.prediction_labels: list[str] = (
            bucket_labels(n_buckets(self.prediction_edges)) if len(self.prediction_edges) else []
        )
        self.prediction_counts = np.zeros(len(self.prediction_labels), dtype=np.int64)
        HISTOGRAMS.add(self)

    def request(self, code: str, seconds: float) -> None:
        counter = self._codes.get(code) or REQUESTS.labels(self.model, self.version, code)
        counter.inc()
        self._duration.observe(seconds)

    def feature_values(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """What is bucketed per row: the raw values, or the summary features."""
        if self.summary is not None:
            return input_summary(self.summary, rows)
        return rows.astype(np.float64)

    def feature_buckets(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
        """Bucket of each feature value, shape (n, n_features), missing values in bucket
        ``n_buckets`` of their feature; the same as :func:`bucket_index`."""
        values = self.feature_values(rows)
        below = values[:, :, None] >= self._edges[None, :, :]
        idx = np.clip(below.sum(axis=2) - 1, 0, self._n_buckets - 1)
        return np.asarray(np.where(np.isnan(values), self._n_buckets, idx), dtype=np.intp)

    def observe(self, rows: npt.NDArray[np.float32], outputs: npt.NDArray[np.float32]) -> None:
        """Count each row's features and its prediction score into the reference buckets."""
        if len(self._edges) and (self.summary is not None or rows.shape[1] == len(self._edges)):
            flat = (self.feature_buckets(rows) + self._offsets).ravel()
            self.feature_counts += np.bincount(flat, minlength=len(self.feature_counts))
        if len(self.prediction_counts):
            scores = prediction_score(self.task, outputs)
            buckets = bucket_index(self.prediction_edges, scores)
            self.prediction_counts += np.bincount(buckets, minlength=len(self.prediction_counts))
