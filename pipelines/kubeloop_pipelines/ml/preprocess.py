"""Cleaning and feature transforms, fitted on the train split and applied to every split, and
the one module that applies them at training *and* at serving time.

Serving encoding
----------------
A client sends one row of floats per example, one per *serving feature*, in order:

- tabular: the selected features as raw values; a categorical value is its integer code into
  ``transform["categories"][feature]`` (an unknown code or NaN counts as missing); NaN marks a
  missing value, which is imputed exactly as in training;
- images: the raw pixels ``C*H*W`` in row-major order;
- text: token ids ``tok_0..tok_{L-1}`` (lowercase words looked up in ``transform["text"]
  ["vocab"]``, unknown words ``1``, padding ``0``; see :func:`encode_texts`).

:func:`transform_module` turns such rows into the network input (impute → clip outliers →
one-hot/ordinal → scale for tables; scale + reshape for images; ids as int64 for text). Training
exports ``Sequential(transform_module(t), network)``, and the prepared arrays themselves are made
by running that same module over each split's serving rows, so the transforms have a single
definition.

Prepared directory (``contract.py`` lists the shared part)
-----------------------------------------------------------
- ``train.npz``, ``validation.npz``, ``test.npz``: ``x`` (the network input), ``y`` (class index
  int64 or value float32) and ``rows`` (the same examples in serving encoding, float32; what
  :meth:`Prepared.serving_rows` returns for drift references and latency tests);
- ``transform.json``: everything fitted (see :func:`fit_transform`); ``schema.json`` (copied from
  ingest); ``quality.json`` (:func:`prepare`'s data-quality report).

This module is longer than the house ~400 lines because fitting, applying and reporting share
private helpers; the torch side (``transform_module``) is kept next to the fitting it mirrors so
the two cannot drift apart.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torch import nn

from kubeloop.api.training_run import Preprocessing, QualityGate
from kubeloop_pipelines.contract import (
    QUALITY_FILE,
    SCHEMA_FILE,
    SPLITS,
    TRANSFORM_FILE,
    StepError,
    read_json,
    write_json,
)
from kubeloop_pipelines.ml.datasets import REVIEW_SYNONYMS, DatasetSchema, label_strings

TRANSFORM_VERSION = 1
PAD_ID = 0
UNK_ID = 1
MIN_SEQ_LEN = 8
MAX_SEQ_LEN = 128
MAX_VOCAB = 20_000
IMPUTER_MAX_ITER = 10
_WORD = re.compile(r"[a-z0-9']+")

FloatArray = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# text


def tokenize(text: str) -> list[str]:
    """Lowercase words (letters, digits, apostrophes); punctuation separates them."""
    return _WORD.findall(text.lower())


def encode_texts(texts: Iterable[Any], vocab: Sequence[str], seq_len: int) -> npt.NDArray[np.int64]:
    """Token ids (n, seq_len): the first ``seq_len`` words, unknown words ``UNK_ID``, padded with
    ``PAD_ID`` at the end; a missing text is all padding."""
    index = {word: i for i, word in enumerate(vocab)}
    rows: list[list[int]] = []
    for text in texts:
        words = tokenize(text) if isinstance(text, str) else []
        ids = [index.get(w, UNK_ID) for w in words[:seq_len]]
        rows.append(ids + [PAD_ID] * (seq_len - len(ids)))
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), seq_len)


def _fit_vocab(texts: pd.Series) -> tuple[list[str], int]:
    counts: Counter[str] = Counter()
    lengths: list[int] = []
    for text in texts:
        words = tokenize(text) if isinstance(text, str) else []
        counts.update(words)
        lengths.append(len(words))
    # most frequent first, ties alphabetically, so the ids are deterministic
    words = sorted(counts, key=lambda w: (-counts[w], w))[: MAX_VOCAB - 2]
    p95 = float(np.percentile(lengths, 95)) if lengths else 0.0
    seq_len = int(min(max(math.ceil(p95 / 8) * 8, MIN_SEQ_LEN), MAX_SEQ_LEN))
    return ["<pad>", "<unk>", *words], seq_len


def synonym_ids(
    vocab: Sequence[str], groups: Iterable[Sequence[str]] = REVIEW_SYNONYMS
) -> dict[str, list[int]]:
    """Token id → ids of its synonyms in ``vocab`` (JSON keys are strings), for augmentation."""
    index = {word: i for i, word in enumerate(vocab)}
    out: dict[str, list[int]] = {}
    for group in groups:
        present = [index[w] for w in group if w in index]
        for token in present:
            others = [o for o in present if o != token]
            if others:
                out[str(token)] = others
    return out


# --------------------------------------------------------------------------------------------
# serving encoding


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
            codes = {c: float(i) for i, c in enumerate(transform["categories"][name])}
            values = frame[name].map(lambda v: codes.get(str(v), np.nan) if pd.notna(v) else np.nan)
            columns.append(values.to_numpy(dtype=np.float32))
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
        self.register_buffer("source", torch.tensor(columns["source"], dtype=torch.int64))
        self.register_buffer("code", _vector(columns["code"], -1.0))
        self.register_buffer("onehot", torch.tensor([c is not None for c in columns["code"]]))
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
        gathered = clipped.index_select(1, self.source)
        encoded = torch.where(self.onehot, (gathered == self.code).to(torch.float32), gathered)
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
        vocab, seq_len = _fit_vocab(train[names[0]])
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
    method = transform["scaling"]["method"]
    if transform["modality"] == "text" or method == "none":
        return
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


# --------------------------------------------------------------------------------------------
# cleaning and the prepared directory


def _targets(frame: pd.DataFrame, schema: DatasetSchema) -> npt.NDArray[Any]:
    if schema.task == "regression":
        return pd.to_numeric(frame[schema.target]).to_numpy(dtype=np.float32)
    index = {label: i for i, label in enumerate(schema.classes)}
    labels = label_strings(frame[schema.target])
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise StepError(
            f"data.target={schema.target!r} holds labels {unknown[:5]} that ingest did not see "
            f"(classes {schema.classes}); rerun ingest on this data",
            field="data.target",
        )
    return labels.map(index).to_numpy(dtype=np.int64)


def _check_no_empty_feature(train: pd.DataFrame, schema: DatasetSchema) -> None:
    empty = [name for name in schema.feature_names if train[name].isna().all()]
    if empty:
        raise StepError(
            f"feature {empty[0]!r} is missing in all {len(train)} training rows"
            + (f" (as are {empty[1:]})" if len(empty) > 1 else "")
            + "; nothing can be learned or imputed from it: drop it from data.features or fix "
            "the data",
            field="data.features",
        )


def _missing_fractions(
    frames: Mapping[str, pd.DataFrame], names: Sequence[str]
) -> dict[str, float]:
    joined = pd.concat([frames[s][list(names)] for s in SPLITS], ignore_index=True)
    return {name: float(joined[name].isna().mean()) for name in names}


def _class_counts(frame: pd.DataFrame, schema: DatasetSchema) -> dict[str, int]:
    counts = label_strings(frame[schema.target]).value_counts()
    return {label: int(counts.get(label, 0)) for label in schema.classes}


@dataclass
class _Cleaning:
    """Row counts removed by each cleaning stage (summed over the splits)."""

    duplicates_found: int = 0
    duplicates_removed: int = 0
    missing_rows_dropped: int = 0
    outlier_rows_dropped: int = 0
    outliers_found: dict[str, int] = field(default_factory=dict)


def _clean_rows(
    frames: dict[str, pd.DataFrame], schema: DatasetSchema, preprocessing: Preprocessing
) -> _Cleaning:
    """Duplicate removal (within each split) and, for strategy ``drop``, rows with a missing
    feature (every split: the user asked to learn and score complete rows only)."""
    cleaning = _Cleaning()
    for name in SPLITS:
        duplicated = frames[name].duplicated(keep="first")
        cleaning.duplicates_found += int(duplicated.sum())
        if preprocessing.drop_duplicates:
            cleaning.duplicates_removed += int(duplicated.sum())
            frames[name] = frames[name].loc[~duplicated].reset_index(drop=True)
        if preprocessing.missing.strategy == "drop":
            incomplete = frames[name][schema.feature_names].isna().any(axis=1)
            cleaning.missing_rows_dropped += int(incomplete.sum())
            frames[name] = frames[name].loc[~incomplete].reset_index(drop=True)
    if frames["train"].empty:
        raise StepError(
            f"no training rows are left after cleaning ({cleaning.duplicates_removed} duplicates "
            f"and {cleaning.missing_rows_dropped} rows with missing values removed); use "
            "another preprocessing.missing.strategy than 'drop' or fix the data",
            field="preprocessing.missing.strategy",
        )
    return cleaning


def _outlier_mask(rows: FloatArray, transform: Mapping[str, Any]) -> npt.NDArray[np.bool_]:
    """(n, features) True where a value lies outside its fitted outlier bounds."""
    mask = np.zeros(rows.shape, dtype=bool)
    for i, bounds in enumerate(transform["outliers"]["bounds"]):
        if bounds is not None:
            with np.errstate(invalid="ignore"):
                mask[:, i] = (rows[:, i] < bounds[0]) | (rows[:, i] > bounds[1])
    return mask


def prepare(
    raw_dir: Path,
    prepared_dir: Path,
    preprocessing: Preprocessing,
    *,
    progress: Any = None,
) -> dict[str, Any]:
    """Clean, fit on train, transform every split and write the prepared directory. Returns the
    data-quality report (also ``quality.json``); the quality gate is evaluated into
    ``report["gate"]`` but not enforced here (see :func:`enforce_quality_gate`), so a failing
    run still leaves its report. ``progress`` is called with short status messages."""

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    schema = DatasetSchema.from_json(read_json(raw_dir / SCHEMA_FILE))
    frames = {name: pd.read_parquet(raw_dir / f"{name}.parquet") for name in SPLITS}
    names = schema.feature_names
    rows_before = {name: len(frames[name]) for name in SPLITS}
    missing_before = _missing_fractions(frames, names)
    balance_before = (
        _class_counts(pd.concat(frames.values()), schema) if schema.task == "classification" else {}
    )
    _check_no_empty_feature(frames["train"], schema)

    say("removing duplicates and incomplete rows")
    cleaning = _clean_rows(frames, schema, preprocessing)
    say(f"fitting transforms on {len(frames['train'])} training rows")
    transform = fit_transform(frames["train"], schema, preprocessing)
    rows = {name: serving_rows(frames[name], transform) for name in SPLITS}
    if schema.modality == "tabular":
        outliers = _outlier_mask(rows["train"], transform)
        cleaning.outliers_found = {
            name: int(outliers[:, i].sum()) for i, name in enumerate(names) if outliers[:, i].any()
        }
        if preprocessing.outliers.action == "drop" and outliers.any():
            keep = ~outliers.any(axis=1)
            cleaning.outlier_rows_dropped = int((~keep).sum())
            frames["train"] = frames["train"].loc[keep].reset_index(drop=True)
            rows["train"] = rows["train"][keep]
    fit_scaling(transform, rows["train"])

    say("transforming the splits")
    prepared_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name in SPLITS:
        x = apply_transform(transform, rows[name])
        arrays[name] = x
        np.savez(
            prepared_dir / f"{name}.npz", x=x, y=_targets(frames[name], schema), rows=rows[name]
        )
    quality = _quality_report(
        schema, transform, preprocessing, frames, arrays, rows_before, missing_before, cleaning
    )
    if balance_before:
        quality["class_balance"]["before"] = balance_before
    write_json(prepared_dir / TRANSFORM_FILE, transform)
    shutil.copyfile(raw_dir / SCHEMA_FILE, prepared_dir / SCHEMA_FILE)
    write_json(prepared_dir / QUALITY_FILE, quality)
    return quality


# --------------------------------------------------------------------------------------------
# data-quality report


def _missing_after(
    transform: Mapping[str, Any], x: npt.NDArray[Any], names: Sequence[str]
) -> dict[str, float]:
    """Per source feature, the fraction of rows whose network input is still NaN."""
    if transform["modality"] != "tabular" or len(x) == 0:
        return dict.fromkeys(names, 0.0)
    nan = np.isnan(x)
    source = np.asarray(transform["columns"]["source"])
    return {
        name: float(nan[:, source == i].any(axis=1).mean()) if (source == i).any() else 0.0
        for i, name in enumerate(names)
    }


def _quality_report(
    schema: DatasetSchema,
    transform: Mapping[str, Any],
    preprocessing: Preprocessing,
    frames: Mapping[str, pd.DataFrame],
    arrays: Mapping[str, npt.NDArray[Any]],
    rows_before: Mapping[str, int],
    missing_before: Mapping[str, float],
    cleaning: _Cleaning,
) -> dict[str, Any]:
    names = schema.feature_names
    total_before = sum(rows_before.values())
    rows_after = {name: len(frames[name]) for name in SPLITS}
    joined = np.concatenate([arrays[s] for s in SPLITS], axis=0)
    missing_after = _missing_after(transform, joined, names)
    outlier_bounds = transform.get("outliers", {}).get("bounds") or [None] * len(names)
    quality: dict[str, Any] = {
        "source": schema.source,
        "modality": schema.modality,
        "task": schema.task,
        "rows": {
            "before": dict(rows_before) | {"total": total_before},
            "after": rows_after | {"total": sum(rows_after.values())},
        },
        "missing_fraction": {
            "before": float(np.mean(list(missing_before.values()))) if names else 0.0,
            "after": float(np.mean(list(missing_after.values()))) if names else 0.0,
        },
        "columns": [
            {
                "name": name,
                "kind": feature.kind,
                "missing_before": missing_before[name],
                "missing_after": missing_after[name],
                "outliers": cleaning.outliers_found.get(name, 0),
                "outlier_bounds": outlier_bounds[i],
            }
            for i, (name, feature) in enumerate(zip(names, schema.features, strict=True))
        ],
        "duplicates": {
            "found": cleaning.duplicates_found,
            "fraction": cleaning.duplicates_found / max(total_before, 1),
            "removed": cleaning.duplicates_removed,
        },
        "missing_rows_dropped": cleaning.missing_rows_dropped,
        "missing_strategy": preprocessing.missing.strategy,
        "outliers": {
            "method": preprocessing.outliers.method,
            "action": preprocessing.outliers.action,
            "threshold": preprocessing.outliers.threshold,
            "found": sum(cleaning.outliers_found.values()),
            "rows_dropped": cleaning.outlier_rows_dropped,
        },
        "class_balance": {},
    }
    if schema.task == "classification":
        quality["class_balance"]["after"] = {
            name: _class_counts(frames[name], schema) for name in SPLITS
        }
    quality["gate"] = evaluate_quality_gate(quality, preprocessing.quality_gate)
    return quality


def evaluate_quality_gate(quality: Mapping[str, Any], gate: QualityGate | None) -> dict[str, Any]:
    """The gate's thresholds, ``passed`` and its ``violations`` ({field, message}); missing
    cells and duplicates are measured before cleaning, rows after."""
    if gate is None:
        return {"enabled": False, "passed": True, "violations": []}
    prefix = "preprocessing.qualityGate"
    missing = float(quality["missing_fraction"]["before"])
    duplicates = float(quality["duplicates"]["fraction"])
    rows = int(quality["rows"]["after"]["total"])
    worst = max(quality["columns"], key=lambda c: c["missing_before"], default=None)
    violations: list[dict[str, str]] = []
    if missing > gate.max_missing_fraction:
        worst_text = f" (worst: {worst['name']!r} {worst['missing_before']:.1%})" if worst else ""
        violations.append(
            {
                "field": f"{prefix}.maxMissingFraction",
                "message": f"{prefix}.maxMissingFraction={gate.max_missing_fraction}: "
                f"{missing:.1%} of the feature cells are missing{worst_text}; raise the limit, "
                "drop the emptiest columns from data.features or fix the data",
            }
        )
    if duplicates > gate.max_duplicate_fraction:
        violations.append(
            {
                "field": f"{prefix}.maxDuplicateFraction",
                "message": f"{prefix}.maxDuplicateFraction={gate.max_duplicate_fraction}: "
                f"{duplicates:.1%} of the rows duplicate another row; raise the limit or "
                "deduplicate the data",
            }
        )
    if rows < gate.min_rows:
        violations.append(
            {
                "field": f"{prefix}.minRows",
                "message": f"{prefix}.minRows={gate.min_rows}: only {rows} rows are left after "
                f"cleaning (of {quality['rows']['before']['total']}); lower the limit, relax "
                "the cleaning (missing.strategy, outliers.action) or add data",
            }
        )
    return {
        "enabled": True,
        "passed": not violations,
        "violations": violations,
        "maxMissingFraction": gate.max_missing_fraction,
        "maxDuplicateFraction": gate.max_duplicate_fraction,
        "minRows": gate.min_rows,
    }


def enforce_quality_gate(quality: Mapping[str, Any]) -> None:
    """Raise :class:`StepError` on the first violated gate field (all of them in the message)."""
    violations = (quality.get("gate") or {}).get("violations") or []
    if violations:
        raise StepError(
            "data quality gate failed: " + "; ".join(v["message"] for v in violations),
            field=violations[0]["field"],
        )


def _chart_png(quality: Mapping[str, Any]) -> str:
    """Bar charts of the missing fraction per column and the class balance, base64 PNG."""
    from matplotlib.figure import Figure

    columns = sorted(quality["columns"], key=lambda c: -c["missing_before"])[:20]
    balance = quality["class_balance"].get("after", {}).get("train", {})
    figure = Figure(figsize=(9, 3.2), dpi=80)
    axes = figure.subplots(1, 2 if balance else 1, squeeze=False)[0]
    axes[0].barh(
        [c["name"][:24] for c in columns][::-1], [c["missing_before"] for c in columns][::-1]
    )
    axes[0].set_xlabel("missing fraction before cleaning")
    axes[0].tick_params(axis="y", labelsize=7)
    if balance:
        axes[1].bar(list(balance)[:30], list(balance.values())[:30], color="tab:orange")
        axes[1].set_title("class balance (train)")
        axes[1].tick_params(axis="x", labelsize=7, rotation=45)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def render_quality_html(quality: Mapping[str, Any]) -> str:
    """A self-contained HTML page (inline CSS, embedded PNG) of the data-quality report."""
    esc = html.escape
    rows = quality["rows"]
    gate = quality.get("gate") or {}
    gate_text = (
        "not configured"
        if not gate.get("enabled")
        else "passed"
        if gate.get("passed")
        else "FAILED: " + "; ".join(v["message"] for v in gate["violations"])
    )
    summary = [
        ("source", quality.get("source", "")),
        ("rows before → after", f"{rows['before']['total']} → {rows['after']['total']}"),
        (
            "missing cells before → after",
            f"{quality['missing_fraction']['before']:.2%} → "
            f"{quality['missing_fraction']['after']:.2%} ({quality['missing_strategy']})",
        ),
        (
            "duplicates found / removed",
            f"{quality['duplicates']['found']} / {quality['duplicates']['removed']}",
        ),
        (
            "outliers found / rows dropped",
            f"{quality['outliers']['found']} / {quality['outliers']['rows_dropped']} "
            f"({quality['outliers']['method']}, {quality['outliers']['action']})",
        ),
        ("quality gate", gate_text),
    ]
    summary_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in summary)
    column_html = "".join(
        f"<tr><td>{esc(c['name'])}</td><td>{esc(c['kind'])}</td>"
        f"<td>{c['missing_before']:.2%}</td><td>{c['missing_after']:.2%}</td>"
        f"<td>{c['outliers']}</td></tr>"
        for c in quality["columns"]
    )
    balance = quality["class_balance"].get("after", {})
    balance_html = "".join(
        f"<tr><td>{esc(split)}</td><td>"
        + esc(", ".join(f"{label}: {count}" for label, count in counts.items()))
        + "</td></tr>"
        for split, counts in balance.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Data quality</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}"
        "</style></head><body><h1>Data quality</h1>"
        f"<table>{summary_html}</table>"
        f"<img alt='missing values and class balance' src='data:image/png;base64,{_chart_png(quality)}'>"
        + (f"<h2>Class balance</h2><table>{balance_html}</table>" if balance_html else "")
        + "<h2>Columns</h2><table><tr><th>column</th><th>kind</th><th>missing before</th>"
        f"<th>missing after</th><th>outliers (train)</th></tr>{column_html}</table>"
        "</body></html>\n"
    )


# --------------------------------------------------------------------------------------------
# reading the prepared directory


@dataclass
class Prepared:
    """The prepared dataset as numpy arrays plus its schema and fitted transform."""

    directory: Path
    schema: dict[str, Any]
    transform: dict[str, Any]
    x_train: npt.NDArray[Any]
    y_train: npt.NDArray[Any]
    x_validation: npt.NDArray[Any]
    y_validation: npt.NDArray[Any]
    x_test: npt.NDArray[Any]
    y_test: npt.NDArray[Any]
    rows: dict[str, FloatArray] = field(default_factory=dict, repr=False)

    def arrays(self, split: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``(x, y)`` of ``split`` (train, validation or test)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {list(SPLITS)}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def serving_rows(self, split: str) -> FloatArray:
        """The same examples as ``arrays(split)`` in serving encoding (float32)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {list(SPLITS)}")
        return self.rows[split]

    @property
    def task(self) -> str:
        return str(self.transform["task"])

    @property
    def modality(self) -> str:
        return str(self.transform["modality"])

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.transform["classes"]]

    @property
    def n_classes(self) -> int:
        return int(self.transform["n_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.transform["input_shape"])

    @property
    def vocab_size(self) -> int:
        return int(self.transform.get("vocab_size") or 0)

    @property
    def serving_features(self) -> list[str]:
        return [str(f) for f in self.transform["serving_features"]]

    @property
    def input_features(self) -> list[str]:
        """Names of the network-input columns (tabular; e.g. ``channel=web`` for one-hot)."""
        return [str(f) for f in self.transform["input_features"]]

    @property
    def synonyms(self) -> dict[int, list[int]]:
        """Token id → synonym ids for text augmentation (empty for other modalities)."""
        return {
            int(k): [int(i) for i in v] for k, v in (self.transform.get("synonyms") or {}).items()
        }


def load_prepared(prepared_dir: str | Path) -> Prepared:
    """Read a directory :func:`prepare` wrote."""
    root = Path(prepared_dir)
    loaded: dict[str, dict[str, npt.NDArray[Any]]] = {}
    for name in SPLITS:
        path = root / f"{name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a prepared dataset directory")
        with np.load(path) as npz:
            loaded[name] = {key: npz[key] for key in npz.files}
    return Prepared(
        directory=root,
        schema=read_json(root / SCHEMA_FILE),
        transform=read_json(root / TRANSFORM_FILE),
        x_train=loaded["train"]["x"],
        y_train=loaded["train"]["y"],
        x_validation=loaded["validation"]["x"],
        y_validation=loaded["validation"]["y"],
        x_test=loaded["test"]["x"],
        y_test=loaded["test"]["y"],
        rows={name: loaded[name]["rows"].astype(np.float32) for name in SPLITS},
    )
