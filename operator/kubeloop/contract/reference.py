"""The reference distributions drift is measured against, and the bucket rule both sides use.

The training side computes a reference (:func:`reference_from_data`) and stores it in the
artifact's ``model.json`` and in the ModelVersion (:func:`manifest_reference`); the serving side
counts every request into the same buckets (:func:`bucket_index`, :func:`input_summary`), so
reference, stable and canary compare like with like. Format::

    {"features":   {<name>: {"edges": [e0, ..., eB], "fractions": [f0, ..., f(B-1), fmissing]}},
     "prediction": {"edges": [...], "fractions": [..., fmissing]},
     "summary":    {"modality": "text", "vocab_size": V, "pad_id": 0, "unk_id": 1}}  # optional

- ``edges`` are ascending bucket boundaries; values outside fall into the first or last bucket.
- ``fractions`` has one entry per bucket and then the share of *missing* values (NaN, the
  serving encoding's missing marker), so ``len(fractions) == len(edges)``; the entries sum
  to 1. Served counts use the bucket labels ``"0"`` .. ``"B-1"`` and ``"missing"``
  (:func:`bucket_labels`, :func:`labelled_fractions`). A reference written before the missing
  bucket existed has ``len(edges) - 1`` fractions: its missing share is 0.
- Feature edges are the training quantiles of the observed (non-missing) values.
- Prediction edges are shared by every version of a model, so the canary's prediction-shift
  check compares the same score ranges (:func:`prediction_edges`): fixed for classifiers
  (:data:`CLASSIFIER_EDGES`, ten equal-width buckets of the score over [0, 1]); for regression
  the validation-prediction quantiles of the first version, carried forward by the operator
  (the runtime's ``--prediction-edges``). The prediction histogram is of one score per row
  (:func:`prediction_score`) on the validation split.
- ``summary``: for text and image models the features are not the input columns (one token
  position or pixel each, meaningless and high-cardinality) but per-row summaries
  (:data:`TEXT_SUMMARY`: sequence length, out-of-vocabulary rate; :data:`IMAGE_SUMMARY`:
  brightness, contrast), computed by :func:`input_summary` on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from kubeloop.contract import serving_metrics
from kubeloop.contract.serving_metrics import bucket_labels

REFERENCE_BUCKETS: Final = 10
MISSING: Final = serving_metrics.MISSING  # the bucket label of a missing value
MAX_BUCKETS: Final = 63  # + the missing share = 64 fractions (the ModelVersion CRD's bound)
MAX_FEATURES: Final = 256
CLASSIFIER_EDGES: Final = tuple(i / REFERENCE_BUCKETS for i in range(REFERENCE_BUCKETS + 1))

TABULAR, TEXT, IMAGE = "tabular", "text", "image"
MODALITIES: Final = (TABULAR, TEXT, IMAGE)
TEXT_SUMMARY: Final = ("sequence_length", "oov_rate")
IMAGE_SUMMARY: Final = ("brightness", "contrast")
# The text serving encoding (pipelines/kubeloop_pipelines/ml/text.py): padding and unknown ids.
PAD_ID: Final = 0
UNK_ID: Final = 1

FloatArray = npt.NDArray[np.float64]


# --- buckets ---------------------------------------------------------------------------------


def n_buckets(edges: Sequence[float] | npt.NDArray[np.float64]) -> int:
    """Value buckets between ``edges`` (at least one), the missing bucket not counted."""
    return max(len(edges) - 1, 1)


def bucket_index(
    edges: Sequence[float] | npt.NDArray[np.float64], values: npt.ArrayLike
) -> npt.NDArray[np.intp]:
    """The bucket of each value: 0 .. B-1, clipped at both ends; NaN → B (the missing bucket)."""
    edges_arr = np.asarray(edges, dtype=np.float64)
    buckets = n_buckets(edges_arr)
    arr = np.asarray(values, dtype=np.float64)
    idx = np.clip(np.searchsorted(edges_arr, arr, side="right") - 1, 0, buckets - 1)
    return np.asarray(np.where(np.isnan(arr), buckets, idx), dtype=np.intp)


def histogram(values: npt.ArrayLike, edges: Sequence[float]) -> dict[str, list[float]]:
    """Fractions of ``values`` per bucket of ``edges``, the missing share last."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    buckets = n_buckets(edges)
    counts = np.bincount(bucket_index(edges, arr), minlength=buckets + 1)
    fractions = counts / max(len(arr), 1)
    return {"edges": [float(e) for e in edges], "fractions": [float(f) for f in fractions]}


def quantile_edges(values: npt.ArrayLike, buckets: int = REFERENCE_BUCKETS) -> list[float]:
    """``buckets`` quantile buckets of the observed (non-NaN) values; repeated quantiles merge,
    so a constant has one bucket ``[c, c]``; no observed value at all gives ``[0, 0]``."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    observed = arr[~np.isnan(arr)]
    if not len(observed):
        return [0.0, 0.0]
    edges = np.unique(np.quantile(observed, np.linspace(0.0, 1.0, buckets + 1)))
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    return [float(e) for e in edges]


def quantile_histogram(values: npt.ArrayLike) -> dict[str, list[float]]:
    """:func:`histogram` on the values' own :func:`quantile_edges`."""
    return histogram(values, quantile_edges(values))


def labelled_fractions(reference: Mapping[str, Any]) -> dict[str, float]:
    """A histogram's fractions keyed by ``bucket`` label, as the served counts are (a reference
    without a missing share, of the older format, has 0 there)."""
    edges = list(reference.get("edges") or [])
    fractions = [float(f) for f in reference.get("fractions") or []]
    labels = bucket_labels(n_buckets(edges))
    out = dict.fromkeys(labels, 0.0)
    out.update(zip(labels, fractions, strict=False))
    return out


# --- what is bucketed --------------------------------------------------------------------------


def prediction_score(task: str, output: npt.ArrayLike) -> FloatArray:
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


def prediction_edges(
    task: str, scores: npt.ArrayLike = (), shared: Sequence[float] = ()
) -> list[float]:
    """The prediction-histogram edges every version of a model shares: ``shared`` when given
    (the first version's, which the operator carries forward), else :data:`CLASSIFIER_EDGES`
    for classifiers and the quantiles of ``scores`` for regression."""
    if len(shared) >= 2:
        return [float(e) for e in shared]
    if task == "classification":
        return list(CLASSIFIER_EDGES)
    return quantile_edges(scores)


def text_summary(vocab_size: int) -> dict[str, Any]:
    """The ``summary`` of a text model whose clients send token ids (``PAD_ID`` or NaN for
    padding, ``UNK_ID`` for unknown words; ids outside [0, vocab_size) are unknown too)."""
    return {"modality": TEXT, "vocab_size": int(vocab_size), "pad_id": PAD_ID, "unk_id": UNK_ID}


def image_summary() -> dict[str, Any]:
    """The ``summary`` of an image model whose clients send raw pixels (NaN: missing)."""
    return {"modality": IMAGE}


def summary_features(summary: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The names of the summary features (empty: the features are the input columns)."""
    modality = (summary or {}).get("modality", TABULAR)
    if modality == TEXT:
        return TEXT_SUMMARY
    if modality == IMAGE:
        return IMAGE_SUMMARY
    if modality == TABULAR:
        return ()
    raise ValueError(f"summary.modality={modality!r}; expected one of {list(MODALITIES)}")


def input_summary(summary: Mapping[str, Any], rows: npt.ArrayLike) -> FloatArray:
    """Per-row summary features, shape (n, 2), NaN where one is missing.

    - text (token ids): ``sequence_length`` = tokens that are not padding (NaN or ``pad_id``);
      ``oov_rate`` = the share of them that are unknown (``unk_id``, or outside
      [0, vocab_size) as the model's token transform treats them); missing for an empty text.
    - image (raw pixels): ``brightness`` = the mean observed pixel, ``contrast`` = their
      standard deviation; missing when every pixel is.
    """
    x = np.asarray(rows, dtype=np.float64)
    x = x.reshape(len(x), -1)
    if summary.get("modality") == TEXT:
        ids = np.round(x)
        padding = np.isnan(ids) | (ids == float(summary.get("pad_id", PAD_ID)))
        vocab = float(summary.get("vocab_size") or np.inf)
        with np.errstate(invalid="ignore"):
            unknown = ~padding & (
                (ids == float(summary.get("unk_id", UNK_ID))) | (ids < 0) | (ids >= vocab)
            )
        length = (~padding).sum(axis=1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            oov = np.where(length > 0, unknown.sum(axis=1) / length, np.nan)
        return np.stack([length, oov], axis=1)
    if summary.get("modality") == IMAGE:
        observed = ~np.isnan(x)
        count = observed.sum(axis=1)
        filled = np.where(observed, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = filled.sum(axis=1) / count
            spread = np.sqrt(np.where(observed, (x - mean[:, None]) ** 2, 0.0).sum(axis=1) / count)
        return np.stack([mean, spread], axis=1)
    raise ValueError(f"summary={dict(summary)!r} has no text or image modality to summarise")


# --- the reference -----------------------------------------------------------------------------


def reference_from_data(
    x: npt.ArrayLike,
    features: Sequence[str],
    predictions: npt.ArrayLike,
    *,
    task: str = "",
    summary: Mapping[str, Any] | None = None,
    shared_prediction_edges: Sequence[float] = (),
) -> dict[str, Any]:
    """The reference of a model: the feature histograms of the raw training rows ``x`` (as the
    clients send them, NaN for missing; summarised first when ``summary`` is given) and the
    prediction histogram of ``predictions`` on the shared edges (:func:`prediction_edges`).

    ``predictions`` are the model's outputs on the validation split, either scores (one per
    row) or probabilities per class, shape (n, n_classes); see :func:`prediction_score`.
    """
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(features):
        raise ValueError(
            f"x has shape {data.shape}; expected (n, {len(features)}) for features "
            f"{list(features)[:5]}"
        )
    names: Sequence[str] = features
    if summary is not None and summary_features(summary):
        names = summary_features(summary)
        data = input_summary(summary, data)
    preds = np.asarray(predictions, dtype=np.float64)
    task = task or ("classification" if preds.ndim == 2 else "regression")
    scores = prediction_score(task, preds)
    # Each histogram says how many rows it counted: drift thresholds treat the reference as a
    # sample of that size, not as the exact distribution.
    out: dict[str, Any] = {
        "features": {
            name: {**quantile_histogram(data[:, i]), "rows": len(data)}
            for i, name in enumerate(names)
        },
        "prediction": {
            **histogram(scores, prediction_edges(task, scores, shared_prediction_edges)),
            "rows": len(scores),
        },
    }
    if summary is not None and summary_features(summary):
        out["summary"] = dict(summary)
    return out


def _bounded(name: str, histogram: Mapping[str, Any]) -> dict[str, Any]:
    edges = [float(e) for e in histogram.get("edges", [])]
    fractions = [float(f) for f in histogram.get("fractions", [])]
    if n_buckets(edges) > MAX_BUCKETS:
        raise ValueError(
            f"reference {name!r} has {n_buckets(edges)} buckets; at most {MAX_BUCKETS} fit a "
            "ModelVersion (plus the missing share)"
        )
    bounded: dict[str, Any] = {"edges": edges, "fractions": fractions}
    if isinstance(histogram.get("rows"), int):
        bounded["rows"] = int(histogram["rows"])
    return bounded


def manifest_reference(reference: Mapping[str, Any]) -> dict[str, Any]:
    """A ``model.json`` reference in the ModelVersion spec's shape: ``reference`` (one entry a
    feature, the summary features for text and image models) and ``predictionReference``
    (the validation-time prediction histogram on the shared edges)."""
    features = reference.get("features") or {}
    out: dict[str, Any] = {
        "reference": [
            {"name": str(name), **_bounded(str(name), hist)}
            for name, hist in list(features.items())[:MAX_FEATURES]
        ]
    }
    prediction = reference.get("prediction")
    if prediction:
        out["predictionReference"] = _bounded("prediction", prediction)
    return out
