"""The runtime's Prometheus metrics, in prometheus_client's default registry (which kserve's
``/metrics`` serves). Their names and labels are :mod:`kubeloop.contract.serving_metrics`, which
the operator's queries read too. Every series carries ``model`` (the deployment) and ``version``
(the ModelVersion), so a canary and its stable version are told apart by label.

kserve's own histograms have no outcome label; the canary analysis needs error rates, and the
drift signals need traffic distributions, hence these.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Histogram

from kubeloop.contract import serving_metrics as contract
from kubeloop.contract.reference import bucket_index, prediction_score

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
FEATURE_BUCKETS = Counter(
    contract.FEATURE_BUCKETS,
    "Request rows by feature and the reference (training) quantile bucket the raw value is in.",
    [contract.MODEL_LABEL, contract.VERSION_LABEL, contract.FEATURE_LABEL, contract.BUCKET_LABEL],
)
PREDICTION_BUCKETS = Counter(
    contract.PREDICTION_BUCKETS,
    "Predictions by the reference quantile bucket of their score (positive-class probability "
    "for binary classification, the value for regression).",
    [contract.MODEL_LABEL, contract.VERSION_LABEL, contract.BUCKET_LABEL],
)


class ServingMetrics:
    """The metrics of one served version, with label children resolved once (per request they
    cost an increment, not a label lookup) and every bucket exported from the start at zero."""

    def __init__(self, model: str, version: str, *, task: str, reference: dict[str, Any]) -> None:
        self.model, self.version, self.task = model, version, task
        self._duration = REQUEST_DURATION.labels(model, version)
        self._codes = {
            code: REQUESTS.labels(model, version, code) for code in ("200", "400", "500")
        }
        features: dict[str, Any] = reference.get("features") or {}
        # Edges of all features in one matrix, padded with +inf (never <= a value), so one
        # comparison finds every feature's bucket: bucket = (#edges <= value) - 1, clipped.
        edges = [np.asarray(ref["edges"], dtype=np.float64) for ref in features.values()]
        width = max((len(e) for e in edges), default=0)
        self._edges = np.full((len(edges), width), np.inf)
        for i, e in enumerate(edges):
            self._edges[i, : len(e)] = e
        self._n_buckets = np.asarray([max(len(e) - 1, 1) for e in edges], dtype=np.intp)
        self._offsets = np.concatenate([[0], np.cumsum(self._n_buckets)[:-1]]).astype(np.intp)
        # One flat list of counters: feature i's bucket b is at offsets[i] + b.
        self._feature_counters: list[Any] = [
            FEATURE_BUCKETS.labels(model, version, name, str(b))
            for name, n in zip(features, self._n_buckets, strict=True)
            for b in range(int(n))
        ]
        prediction = reference.get("prediction") or {}
        self._prediction_edges = np.asarray(prediction.get("edges") or [], dtype=np.float64)
        self._prediction_counters = [
            PREDICTION_BUCKETS.labels(model, version, str(b))
            for b in range(max(len(self._prediction_edges) - 1, 1))
        ]

    def request(self, code: str, seconds: float) -> None:
        counter = self._codes.get(code) or REQUESTS.labels(self.model, self.version, code)
        counter.inc()
        self._duration.observe(seconds)

    def feature_buckets(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
        """Bucket of each raw value, shape (n, n_features); the same as :func:`bucket_index`."""
        below = rows.astype(np.float64)[:, :, None] >= self._edges[None, :, :]
        idx = below.sum(axis=2) - 1
        return np.asarray(np.clip(idx, 0, self._n_buckets - 1), dtype=np.intp)

    def observe(self, rows: npt.NDArray[np.float32], outputs: npt.NDArray[np.float32]) -> None:
        """Count each row's raw feature values and its prediction score into reference buckets."""
        if len(self._edges) and rows.shape[1] == len(self._edges):
            flat = (self.feature_buckets(rows) + self._offsets).ravel()
            self._count(self._feature_counters, flat)
        if len(self._prediction_edges):
            scores = prediction_score(self.task, outputs)
            self._count(self._prediction_counters, bucket_index(self._prediction_edges, scores))

    @staticmethod
    def _count(counters: list[Any], indices: npt.NDArray[np.intp]) -> None:
        if len(indices) <= 64:
            for i in indices.tolist():
                counters[i].inc()
            return
        for i, n in enumerate(np.bincount(indices, minlength=len(counters)).tolist()):
            if n:
                counters[i].inc(n)
