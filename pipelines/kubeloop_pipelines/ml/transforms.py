"""The feature transforms: fitted on the train split (:func:`fit_transform`,
:func:`fit_scaling`) and applied by one torch module (:func:`transform_module`) at training
*and* at serving time.

Serving encoding
----------------
A client sends one row of floats per example, one per *serving feature*, in order:

- tabular: the selected features as raw values; a categorical value is its integer code into
  ``transform["categories"][feature]`` (an unknown code or NaN counts as missing); NaN marks a
  missing value, which is imputed exactly as in training;
- images: the raw pixels ``C*H*W`` in row-major order;
- text: token ids ``tok_0..tok_{L-1}`` (lowercase words looked up in ``transform["text"]
  ["vocab"]``, unknown words ``1``, padding ``0``; see ``encode_texts`` in ml/text.py).

:func:`transform_module` turns such rows into the network input (impute → clip outliers →
one-hot/ordinal → scale for tables; scale + reshape for images; ids as int64 for text). Training
exports ``Sequential(transform_module(t), network)``, and the prepared arrays themselves are made
by running that same module over each split's serving rows (ml/preprocess.py), so the
transforms have a single definition.

This module is a little longer than the house ~400 lines because the fitting writes exactly the
``transform.json`` keys the torch modules read; keeping the two side by side keeps them from
drifting apart.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torch import nn

from kubeloop.api.training_run import Preprocessing
from kubeloop_pipelines.ml.datasets import DatasetSchema
from kubeloop_pipelines.ml.text import PAD_ID, UNK_ID, encode_texts, fit_vocab, synonym_ids

TRANSFORM_VERSION = 1
IMPUTER_MAX_ITER = 10

FloatArray = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# serving encoding


def _category_codes(column: pd.Series, categories: Sequence[str]) -> FloatArray:
    """Index of each value in ``categories`` (compared as strings); NaN when missing/unknown."""
    codes = {category: float(i) for i, category in enumerate(categories)}
    values = [codes.get(str(v), np.nan) if pd.notna(v) else np.nan for v in column]
    return np.asarray(values, dtype=np.float32)


def serving_rows(frame: pd.DataFrame, transform: Mapping[str, Any]) -> FloatArray:
    """The rows of ``frame`` (raw selected features) in serving encoding, float32."""
    modality = transform["modality"]
    if modality == "text":
        text = transform["text"]
        ids = encode_texts(frame[text["column"]], text["vocab"], int(text["seq_len"]))
        return ids.astype(np.float32)
    columns: list[FloatArray] = []
    for name, kind in zip(transform["source_features"], transform["feature_kinds"], strict=True):
        if kind == "categorical":
            columns.append(_category_codes(frame[name], transform["categories"][name]))
        else:
            columns.append(pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float32))
    if not columns:
        return np.zeros((len(frame), 0), dtype=np.float32)
    return np.stack(columns, axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the torch module


def _vector(values: Sequence[float | None], default: float) -> torch.Tensor:
    return torch.tensor([default if v is None else float(v) for v in values], dtype=torch.float32)


class _ImputeStep(nn.Module):
    """One linear imputation of IterativeImputer: feature ``column`` from the current values of
    the ``neighbors``, written only where that feature was missing."""

    column: torch.Tensor
    neighbors: torch.Tensor
    coef: torch.Tensor

    def __init__(self, step: Mapping[str, Any], width: int) -> None:
        super().__init__()
        mask = torch.zeros(width, dtype=torch.bool)
        mask[int(step["feature"])] = True
        self.register_buffer("column", mask)
        self.register_buffer("neighbors", torch.tensor(step["neighbors"], dtype=torch.int64))
        self.register_buffer("coef", torch.tensor(step["coef"], dtype=torch.float32))
        self.intercept = float(step["intercept"])

    def forward(self, filled: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        predicted = filled.index_select(1, self.neighbors) @ self.coef + self.intercept
        return torch.where(self.column & missing, predicted.unsqueeze(1), filled)


class TabularTransform(nn.Module):
    """Serving rows (n, features) with NaN → network input (n, d), vectorised for export."""

    fill: torch.Tensor
    category_count: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    source_index: torch.Tensor
    category_code: torch.Tensor
    is_onehot: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor

    def __init__(self, transform: Mapping[str, Any]) -> None:
        super().__init__()
        impute = transform["impute"]
        width = len(transform["serving_features"])
        counts = [len(transform["categories"].get(n, [])) for n in transform["serving_features"]]
        self.register_buffer("fill", _vector(impute["values"], 0.0))
        self.register_buffer("category_count", _vector(counts, 0.0))
        self.register_buffer("lower", _vector(transform["outliers"]["lower"], -math.inf))
        self.register_buffer("upper", _vector(transform["outliers"]["upper"], math.inf))
        columns = transform["columns"]
        self.register_buffer("source_index", torch.tensor(columns["source"], dtype=torch.int64))
        self.register_buffer("category_code", _vector(columns["code"], -1.0))
        self.register_buffer("is_onehot", torch.tensor([c is not None for c in columns["code"]]))
        self.register_buffer("center", _vector(transform["scaling"]["center"], 0.0))
        self.register_buffer("scale", _vector(transform["scaling"]["scale"], 1.0))
        self.steps = nn.ModuleList(_ImputeStep(s, width) for s in impute.get("iterative", []))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        x = rows.to(torch.float32)
        categorical = self.category_count > 0
        # an unknown category code is treated like a missing value (NaN compares False)
        invalid = categorical & ((x < 0) | (x >= self.category_count) | (x != torch.floor(x)))
        missing = torch.isnan(x) | invalid
        filled = torch.where(missing, self.fill, x)
        for step in self.steps:
            filled = step(filled, missing)
        clipped = torch.clamp(filled, min=self.lower, max=self.upper)
        gathered = clipped.index_select(1, self.source_index)
        encoded = torch.where(
            self.is_onehot, (gathered == self.category_code).to(torch.float32), gathered
        )
        return (encoded - self.center) / self.scale


class ImageTransform(nn.Module):
    """Pixel rows (n, C*H*W) → scaled images (n, C, H, W); a missing pixel gets the train mean."""

    def __init__(self, transform: Mapping[str, Any]) -> None:
        super().__init__()
        scaling = transform["scaling"]
        self.shape = tuple(int(s) for s in transform["input_shape"])
        self.fill = float(transform["impute"]["values"][0])
        self.center = float(scaling["center"][0])
        self.scale = float(scaling["scale"][0])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        x = rows.to(torch.float32)
        x = torch.where(torch.isnan(x), torch.full_like(x, self.fill), x)
        return ((x - self.center) / self.scale).reshape(-1, *self.shape)


class TokenTransform(nn.Module):
    """Token-id rows (n, L) as floats → int64 ids; NaN is padding, out-of-range ids unknown."""

    def __init__(self, transform: Mapping[str, Any]) -> None:
        super().__init__()
        self.vocab_size = int(transform["vocab_size"])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        x = torch.round(rows.to(torch.float32))
        x = torch.where(torch.isnan(x), torch.full_like(x, PAD_ID), x)
        x = torch.where((x < 0) | (x >= self.vocab_size), torch.full_like(x, UNK_ID), x)
        return x.to(torch.int64)


def transform_module(transform: Mapping[str, Any]) -> nn.Module:
    """The fitted transforms of ``transform.json`` as a module (serving rows → network input)
    that ``torch.export`` exports with a dynamic batch dimension."""
    modality = transform["modality"]
    module: nn.Module
    if modality == "image":
        module = ImageTransform(transform)
    elif modality == "text":
        module = TokenTransform(transform)
    else:
        module = TabularTransform(transform)
    return module.eval()


def apply_transform(transform: Mapping[str, Any], rows: FloatArray) -> npt.NDArray[Any]:
    """:func:`transform_module` over numpy rows, in batches (numpy out)."""
    module = transform_module(transform)
    outputs: list[npt.NDArray[Any]] = []
    with torch.inference_mode():
        for start in range(0, max(len(rows), 1), 65_536):
            batch = torch.from_numpy(np.ascontiguousarray(rows[start : start + 65_536]))
            outputs.append(module(batch).numpy())
    return np.concatenate(outputs, axis=0)


# --------------------------------------------------------------------------------------------
# fitting


def _most_frequent(values: FloatArray) -> float:
    observed = values[~np.isnan(values)]
    uniques, counts = np.unique(observed, return_counts=True)
    return float(uniques[np.argmax(counts)])  # ties: the smallest value


def _statistic(values: FloatArray, strategy: str) -> float:
    observed = values[~np.isnan(values)].astype(np.float64)
    if strategy == "mean":
        return float(observed.mean())
    if strategy == "most_frequent":
        return _most_frequent(values)
    return float(np.median(observed))  # median, and the serving fallback of drop/model


def _fit_iterative(
    numeric: FloatArray, positions: Sequence[int]
) -> tuple[list[float], list[dict[str, Any]]]:
    """IterativeImputer (BayesianRidge, mean start) on the numeric columns; its linear steps
    re-indexed to serving positions so :class:`_ImputeStep` replays them."""
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    imputer = IterativeImputer(max_iter=IMPUTER_MAX_ITER, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the last round is used anyway
        imputer.fit(numeric.astype(np.float64))
    start = [float(v) for v in imputer.initial_imputer_.statistics_]
    steps = [
        {
            "feature": int(positions[t.feat_idx]),
            "neighbors": [int(positions[i]) for i in t.neighbor_feat_idx],
            "coef": [float(c) for c in t.estimator.coef_],
            "intercept": float(t.estimator.intercept_),
        }
        for t in imputer.imputation_sequence_
    ]
    return start, steps


def _outlier_bounds(
    values: FloatArray, method: str, threshold: float
) -> tuple[float, float] | None:
    """Bounds beyond which a value is an outlier, or None where the test makes no sense
    (binary/constant columns, whose spread is zero, would flag every minority value)."""
    observed = values[~np.isnan(values)].astype(np.float64)
    if method == "none" or len(np.unique(observed)) <= 2:
        return None
    if method == "iqr":
        q1, q3 = np.percentile(observed, [25, 75])
        spread = q3 - q1
        low, high = q1 - threshold * spread, q3 + threshold * spread
    else:
        spread = float(observed.std())
        low, high = observed.mean() - threshold * spread, observed.mean() + threshold * spread
    return (float(low), float(high)) if spread > 0 else None


def fit_transform(
    train: pd.DataFrame, schema: DatasetSchema, preprocessing: Preprocessing
) -> dict[str, Any]:
    """Fit every transform on the (cleaned) train split; the scaling is left at identity here
    and fitted by :func:`fit_scaling` on the module's own output. Keys of the result (all
    JSON): modality, task, target, classes, n_classes, serving_features, source_features,
    feature_kinds, categories, impute {strategy, values, iterative}, outliers {method, action,
    threshold, lower, upper, bounds}, encoding, columns {source, code}, input_features,
    scaling {method, center, scale}, input_shape, vocab_size, text, synonyms, target_stats."""
    names = schema.feature_names
    kinds = [f.kind for f in schema.features]
    transform: dict[str, Any] = {
        "version": TRANSFORM_VERSION,
        "modality": schema.modality,
        "task": schema.task,
        "target": schema.target,
        "classes": list(schema.classes),
        "n_classes": len(schema.classes),
        "source_features": names,
        "feature_kinds": kinds,
        "categories": {},
        "encoding": preprocessing.encoding,
        "vocab_size": 0,
        "text": None,
        "synonyms": {},
    }
    if schema.task == "regression":
        y = pd.to_numeric(train[schema.target]).to_numpy(dtype=np.float64)
        transform["target_stats"] = {"mean": float(y.mean()), "std": float(y.std() or 1.0)}
    if schema.modality == "text":
        vocab, seq_len = fit_vocab(train[names[0]])
        transform.update(
            serving_features=[f"tok_{i}" for i in range(seq_len)],
            text={"column": names[0], "vocab": vocab, "seq_len": seq_len},
            vocab_size=len(vocab),
            synonyms=synonym_ids(vocab),
            input_shape=[seq_len],
            input_features=[f"tok_{i}" for i in range(seq_len)],
        )
        return transform
    transform["categories"] = {
        name: sorted({str(v) for v in train[name].dropna()})
        for name, kind in zip(names, kinds, strict=True)
        if kind == "categorical"
    }
    transform["serving_features"] = names
    rows = serving_rows(train, transform)
    if schema.modality == "image":
        pixels = rows[~np.isnan(rows)]
        transform.update(
            impute={"strategy": "mean", "values": [float(pixels.mean())], "iterative": []},
            input_shape=list(schema.image_shape or []),
            input_features=names,
            scaling={"method": preprocessing.scaling, "center": [0.0], "scale": [1.0]},
        )
        return transform
    transform["impute"] = _fit_imputation(rows, kinds, preprocessing.missing.strategy)
    transform["outliers"] = _fit_outliers(rows, kinds, preprocessing)
    source: list[int] = []
    code: list[int | None] = []
    input_features: list[str] = []
    for position, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        if kind == "categorical" and preprocessing.encoding == "onehot":
            for index, category in enumerate(transform["categories"][name]):
                source.append(position)
                code.append(index)
                input_features.append(f"{name}={category}")
        else:
            source.append(position)
            code.append(None)
            input_features.append(name)
    transform.update(
        columns={"source": source, "code": code},
        input_features=input_features,
        input_shape=[len(input_features)],
        scaling={
            "method": preprocessing.scaling,
            "center": [0.0] * len(source),
            "scale": [1.0] * len(source),
        },
    )
    return transform


def _fit_imputation(rows: FloatArray, kinds: Sequence[str], strategy: str) -> dict[str, Any]:
    """Initial fill values per serving feature (categoricals: the most frequent code, whatever
    the strategy) and, for ``model``, the IterativeImputer steps over the numeric features."""
    values = [
        _most_frequent(rows[:, i]) if kind == "categorical" else _statistic(rows[:, i], strategy)
        for i, kind in enumerate(kinds)
    ]
    iterative: list[dict[str, Any]] = []
    numeric = [i for i, kind in enumerate(kinds) if kind != "categorical"]
    if strategy == "model" and len(numeric) >= 2:
        start, iterative = _fit_iterative(rows[:, numeric], numeric)
        for position, value in zip(numeric, start, strict=True):
            values[position] = value
    return {"strategy": strategy, "values": values, "iterative": iterative}


def _fit_outliers(
    rows: FloatArray, kinds: Sequence[str], preprocessing: Preprocessing
) -> dict[str, Any]:
    settings = preprocessing.outliers
    bounds: list[list[float] | None] = []
    for i, kind in enumerate(kinds):
        found = (
            None
            if kind == "categorical"
            else _outlier_bounds(rows[:, i], settings.method, settings.threshold)
        )
        bounds.append(list(found) if found else None)
    clip = settings.action == "clip"
    return {
        "method": settings.method,
        "action": settings.action,
        "threshold": settings.threshold,
        "bounds": bounds,  # what counts as an outlier (reporting, train-row dropping)
        # what the module clamps to: only with action=clip; dropped outliers are not clamped
        "lower": [b[0] if b and clip else None for b in bounds],
        "upper": [b[1] if b and clip else None for b in bounds],
    }


def fit_scaling(transform: dict[str, Any], train_rows: FloatArray) -> None:
    """Set ``scaling.center/scale`` from the train split as the module outputs it with identity
    scaling (so it is fitted after imputation, clipping and encoding). One-hot columns and
    text are not scaled; images use one statistic for all pixels."""
    if transform["modality"] == "text" or transform["scaling"]["method"] == "none":
        return
    method = transform["scaling"]["method"]
    encoded = apply_transform(transform, train_rows).astype(np.float64)
    flat = encoded.reshape(1, -1).T if transform["modality"] == "image" else encoded
    if method == "standard":
        center = flat.mean(axis=0)
        scale = flat.std(axis=0)
    else:
        center = flat.min(axis=0)
        scale = flat.max(axis=0) - center
    scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
    if transform["modality"] == "tabular":
        onehot = np.array([c is not None for c in transform["columns"]["code"]], dtype=bool)
        center = np.where(onehot, 0.0, center)
        scale = np.where(onehot, 1.0, scale)
    transform["scaling"]["center"] = [float(c) for c in np.atleast_1d(center)]
    transform["scaling"]["scale"] = [float(s) for s in np.atleast_1d(scale)]
