"""The reference distributions drift is measured against, and the bucket rule both sides use.

The training side computes a reference from the training data (:func:`reference_from_data`),
stores it in the artifact's ``model.json`` and in the ModelVersion (:func:`manifest_reference`);
the serving side counts every raw value into the same buckets (:func:`bucket_index`). Format::

    {"features":   {<name>: {"edges": [e0, ..., eB], "fractions": [f1, ..., fB]}, ...},
     "prediction": {"edges": [...], "fractions": [...]}}

``edges`` are ascending bucket boundaries (first = the training minimum, last = the maximum);
values outside fall into the first or last bucket. The prediction histogram is of one score per
row (:func:`prediction_score`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

REFERENCE_BUCKETS: Final = 10
MAX_EDGES: Final = 65  # at most 64 buckets (the ModelVersion CRD's bound)
MAX_FEATURES: Final = 256


def bucket_index(
    edges: Sequence[float] | npt.NDArray[np.float64], values: npt.ArrayLike
) -> npt.NDArray[np.intp]:
    """The reference bucket of each value."""
    edges_arr = np.asarray(edges, dtype=np.float64)
    n_buckets = max(len(edges_arr) - 1, 1)
    idx = np.searchsorted(edges_arr, np.asarray(values, dtype=np.float64), side="right") - 1
    return np.asarray(np.clip(idx, 0, n_buckets - 1), dtype=np.intp)


def prediction_score(task: str, output: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """One number per row to bucket: the positive-class probability for binary classification,
    the top-class probability for more classes, the value itself for regression."""
    arr = np.asarray(output, dtype=np.float64)
    if arr.ndim == 1:
        return arr
    if task == "classification" and arr.shape[1] == 2:
        return arr[:, 1]
    if task == "classification":
        return np.asarray(arr.max(axis=1))
    return arr.reshape(len(arr), -1)[:, 0]


def quantile_histogram(values: npt.NDArray[np.float64]) -> dict[str, list[float]]:
    """``REFERENCE_BUCKETS`` quantile buckets of ``values`` (repeated quantiles merge)."""
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, REFERENCE_BUCKETS + 1))
    edges = np.unique(quantiles)
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    counts = np.bincount(bucket_index(edges, values), minlength=len(edges) - 1)
    fractions = counts / max(len(values), 1)
    return {
        "edges": [float(e) for e in edges],
        "fractions": [float(f) for f in fractions],
    }


def reference_from_data(
    x: npt.ArrayLike, features: Sequence[str], predictions: npt.ArrayLike, *, task: str = ""
) -> dict[str, Any]:
    """Reference distributions from the training data: quantile buckets per feature (of the
    raw, unscaled values the clients send) and for the prediction score.

    ``predictions`` are either scores (one per row) or the model's outputs (probabilities per
    class, shape (n, n_classes)); see :func:`prediction_score`.
    """
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(features):
        raise ValueError(
            f"x has shape {data.shape}; expected (n, {len(features)}) for features {list(features)}"
        )
    preds = np.asarray(predictions, dtype=np.float64)
    scores = prediction_score(task or ("classification" if preds.ndim == 2 else ""), preds)
    if len(scores) != len(data):
        raise ValueError(f"predictions has {len(scores)} rows; x has {len(data)}")
    return {
        "features": {name: quantile_histogram(data[:, i]) for i, name in enumerate(features)},
        "prediction": quantile_histogram(scores),
    }


def _bounded(histogram: Mapping[str, Any]) -> dict[str, list[float]]:
    return {
        "edges": [float(e) for e in histogram.get("edges", [])][:MAX_EDGES],
        "fractions": [float(f) for f in histogram.get("fractions", [])][: MAX_EDGES - 1],
    }


def manifest_reference(reference: Mapping[str, Any]) -> dict[str, Any]:
    """A ``model.json`` reference in the ModelVersion spec's shape: ``reference`` (one entry a
    feature) and ``predictionReference`` (the validation-time prediction histogram)."""
    features = reference.get("features") or {}
    out: dict[str, Any] = {
        "reference": [
            {"name": str(name), **_bounded(hist)}
            for name, hist in list(features.items())[:MAX_FEATURES]
        ]
    }
    prediction = reference.get("prediction")
    if prediction:
        out["predictionReference"] = _bounded(prediction)
    return out
