"""Where training data comes from and what it looks like: reading tables from file://, s3:// and
gs:// (``builtin://`` datasets come from ml/builtin_datasets.py; ``format: requestLog`` reads
a serving request log, serving/request_log.py), schema inference and the seeded
train/validation/test split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from kubeloop.api.training_run import DataSource, Split
from kubeloop_pipelines.contract import SPLITS, Modality, StepError
from kubeloop_pipelines.ml.builtin_datasets import BUILTIN_MODALITY, DIGITS_SHAPE, load_builtin

FeatureKind = Literal["numeric", "categorical", "text"]

# A string column whose values average at least this many words is free text, not a category.
TEXT_MIN_MEAN_WORDS = 3.0
# A numeric classification target with more distinct non-integer values than this is surely
# a regression target given the wrong task.
MAX_FLOAT_CLASSES = 20


# --------------------------------------------------------------------------------------------
# reading tables


def table_format(uri: str, fmt: str) -> Literal["csv", "parquet"]:
    """The file format to read ``uri`` with: explicit csv/parquet, else from the extension
    (``images`` and ``text`` name the modality; their files are csv or parquet tables too)."""
    if fmt in ("csv", "parquet"):
        return "csv" if fmt == "csv" else "parquet"
    path = uri.lower().split("?", 1)[0]
    for suffix in (".gz", ".bz2", ".zip", ".xz", ".zst"):
        path = path.removesuffix(suffix)
    if path.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    if path.endswith((".parquet", ".pq")):
        return "parquet"
    raise StepError(
        f"data.format={fmt!r} cannot tell how to read {uri}: the name ends in neither .csv nor "
        ".parquet; set data.format to 'csv' or 'parquet'",
        field="data.format",
    )


def read_table(
    uri: str, fmt: str, *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Read a csv or parquet table from a ``file://``, ``s3://`` or ``gs://`` URI (fsspec;
    credentials from ``storage_options`` or the environment). Unreadable, missing or empty data
    raises :class:`StepError` on ``data.uri`` naming the URI and the reason."""
    import fsspec

    kind = table_format(uri, fmt)
    options = dict(storage_options or {})
    try:
        if kind == "csv":
            sep = "\t" if ".tsv" in uri.lower() else ","
            with fsspec.open(uri, "rb", compression="infer", **options) as handle:
                frame = pd.read_csv(handle, sep=sep)
        else:
            with fsspec.open(uri, "rb", **options) as handle:
                frame = pd.read_parquet(handle)
    except FileNotFoundError:
        raise StepError(
            f"data.uri={uri} does not exist; point it at a {kind} file", field="data.uri"
        ) from None
    except PermissionError as exc:
        raise StepError(
            f"data.uri={uri} cannot be read: permission denied ({exc}); check "
            "data.credentialsSecret",
            field="data.uri",
        ) from exc
    except pd.errors.EmptyDataError:
        raise StepError(
            f"data.uri={uri} is empty: the file holds no rows", field="data.uri"
        ) from None
    except (ValueError, pd.errors.ParserError, OSError, UnicodeDecodeError) as exc:
        # pyarrow's errors derive from ValueError/OSError; a network hiccup may heal
        transient = isinstance(exc, OSError) and not isinstance(exc, IsADirectoryError)
        raise StepError(
            f"data.uri={uri} cannot be read as {kind}: {exc}",
            field="data.uri",
            permanent=not transient,
        ) from exc
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise StepError(
            f"data.uri={uri} is empty: it holds {frame.shape[0]} rows and {frame.shape[1]} "
            "columns; expected a header and at least one row",
            field="data.uri",
        )
    frame.columns = [str(c) for c in frame.columns]
    return frame


def load_data(
    data: DataSource, *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The whole table ``data.uri`` points at (a built-in dataset or a file)."""
    if data.uri.startswith("builtin://"):
        return load_builtin(data.uri.removeprefix("builtin://"))
    if data.format == "requestLog":
        return load_request_log(data, storage_options=storage_options)
    return read_table(data.uri, data.format, storage_options=storage_options)


def load_request_log(
    data: DataSource, *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """A serving request log (``format: requestLog``) as a table: one row a served row, the
    features in the served signature's order (or ``data.features``'), then the fed-back label
    as the target column ``data.target`` (null where no label came; ingest drops those)."""
    from kubeloop.serving.request_log_reader import RequestLogError, read_request_log

    try:
        log = read_request_log(
            data.uri, features=data.features or None, storage_options=storage_options
        )
    except RequestLogError as exc:
        raise StepError(str(exc), field=f"data.{exc.field}") from exc
    except FileNotFoundError:
        raise StepError(
            f"data.uri={data.uri} does not exist; point it at a ModelDeployment's request log",
            field="data.uri",
        ) from None
    except PermissionError as exc:
        raise StepError(
            f"data.uri={data.uri} cannot be read: permission denied ({exc}); check "
            "data.credentialsSecret",
            field="data.uri",
        ) from exc
    except (ValueError, OSError) as exc:  # pyarrow's errors derive from these
        raise StepError(
            f"data.uri={data.uri} cannot be read as a request log: {exc}",
            field="data.uri",
            permanent=not isinstance(exc, OSError),
        ) from exc
    if data.target in log.features:
        raise StepError(
            f"data.target={data.target!r} is a feature of the request log; name the label "
            f"column something else (features: {_preview(log.features)})",
            field="data.target",
        )
    if log.task != data.task:
        raise StepError(
            f"data.task={data.task!r}, but the request log is of a {log.task} model; its "
            f"labels are {'class names' if log.task == 'classification' else 'numbers'}",
            field="data.task",
        )
    frame = log.frame.loc[:, [*log.features, "label"]].rename(columns={"label": data.target})
    frame.columns = [str(c) for c in frame.columns]
    return frame


# --------------------------------------------------------------------------------------------
# schema


@dataclass
class FeatureInfo:
    """One selected input column and how it is treated."""

    name: str
    kind: FeatureKind


@dataclass
class DatasetSchema:
    """What ingest learned about the data; ``schema.json`` in the raw and prepared layouts."""

    target: str
    task: Literal["classification", "regression"]
    modality: Modality
    features: list[FeatureInfo]
    classes: list[str] = field(default_factory=list)
    image_shape: list[int] | None = None
    source: str = ""
    sha256: str = ""
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def names_of(self, kind: FeatureKind) -> list[str]:
        return [f.name for f in self.features if f.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "task": self.task,
            "modality": self.modality,
            "features": [{"name": f.name, "kind": f.kind} for f in self.features],
            "classes": list(self.classes),
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "source": self.source,
            "sha256": self.sha256,
            "rows": dict(self.rows),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> DatasetSchema:
        return cls(
            target=str(value["target"]),
            task=value["task"],
            modality=value["modality"],
            features=[FeatureInfo(str(f["name"]), f["kind"]) for f in value["features"]],
            classes=[str(c) for c in value.get("classes") or []],
            image_shape=[int(s) for s in value["image_shape"]]
            if value.get("image_shape")
            else None,
            source=str(value.get("source", "")),
            sha256=str(value.get("sha256", "")),
            rows={str(k): int(v) for k, v in (value.get("rows") or {}).items()},
        )


def _preview(values: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", … ({len(values)} in all)" if len(values) > limit else "")


def select_columns(frame: pd.DataFrame, data: DataSource) -> pd.DataFrame:
    """The selected features (``data.features``, or every column but the target) and the
    target, in that order; wrong names raise :class:`StepError` listing the columns there are."""
    columns = [str(c) for c in frame.columns]
    if data.target not in columns:
        raise StepError(
            f"data.target={data.target!r} is not a column of {data.uri}; available columns: "
            f"{_preview(columns)}",
            field="data.target",
        )
    if data.features:
        missing = [f for f in data.features if f not in columns]
        if missing:
            raise StepError(
                f"data.features names columns that {data.uri} does not have: {missing}; "
                f"available columns: {_preview(columns)}",
                field="data.features",
            )
        if data.target in data.features:
            raise StepError(
                f"data.features includes the target {data.target!r}; list only input columns",
                field="data.features",
            )
        duplicates = sorted({f for f in data.features if data.features.count(f) > 1})
        if duplicates:
            raise StepError(
                f"data.features lists {duplicates} more than once; list each column once",
                field="data.features",
            )
        features = list(data.features)
    else:
        features = [c for c in columns if c != data.target]
    if not features:
        raise StepError(
            f"{data.uri} has no column besides the target {data.target!r}; add feature columns",
            field="data.features",
        )
    return frame.loc[:, [*features, data.target]]


def label_strings(target: pd.Series) -> pd.Series:
    """Class labels as strings, one definition for ingest and preprocess: whole-number floats
    (what a csv with gaps gives for integer labels) print without ``.0``."""
    if pd.api.types.is_bool_dtype(target):
        return target.map(lambda v: str(bool(v)).lower())
    if pd.api.types.is_float_dtype(target):
        values = target.to_numpy(dtype=np.float64)
        if np.all(np.isnan(values) | (values == np.round(values))):
            return target.map(lambda v: str(int(v)) if not math.isnan(v) else v)
    return target.map(str)


def sorted_classes(target: pd.Series) -> list[str]:
    """The class labels of a target column (nulls ignored), numbers in numeric order."""
    present = target.dropna()
    if pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present):
        unique = np.unique(present.to_numpy(dtype=np.float64))
        return list(label_strings(pd.Series(unique)))
    return sorted(set(label_strings(present)))


def _is_text(column: pd.Series) -> bool:
    values = column.dropna()
    if values.empty:
        return False
    words = values.astype(str).str.split().str.len()
    return bool(words.mean() >= TEXT_MIN_MEAN_WORDS)


def _feature_kind(column: pd.Series) -> FeatureKind:
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return "numeric"
    return "text" if _is_text(column) else "categorical"


def _image_shape(n_pixels: int) -> list[int] | None:
    for channels in (1, 3):
        side = math.isqrt(n_pixels // channels)
        if channels * side * side == n_pixels:
            return [channels, side, side]
    return None


def _builtin_name(uri: str) -> str:
    return uri.removeprefix("builtin://") if uri.startswith("builtin://") else ""


def infer_schema(frame: pd.DataFrame, data: DataSource) -> DatasetSchema:
    """Feature kinds, modality, classes and image shape of the selected columns (the frame
    :func:`select_columns` returns), checking that the target suits ``data.task``."""
    target = frame[data.target]
    present = target.dropna()
    if data.task == "regression":
        if not pd.api.types.is_numeric_dtype(present) or pd.api.types.is_bool_dtype(present):
            raise StepError(
                f"data.task='regression' needs a numeric target, but column {data.target!r} "
                f"holds {present.dtype} values (e.g. {_preview(list(present.unique()), 3)}); "
                "use task: classification, or a numeric target",
                field="data.task",
            )
        classes: list[str] = []
    else:
        if pd.api.types.is_float_dtype(present):
            values = present.to_numpy(dtype=np.float64)
            fractional = values != np.round(values)
            if fractional.any() and present.nunique() > MAX_FLOAT_CLASSES:
                raise StepError(
                    f"data.task='classification' but target {data.target!r} holds "
                    f"{present.nunique()} distinct fractional values; use task: regression",
                    field="data.task",
                )
        classes = sorted_classes(target)
        if len(classes) < 2:
            raise StepError(
                f"data.target={data.target!r} has {len(classes)} class(es) "
                f"({_preview(classes)}); classification needs at least 2 distinct labels",
                field="data.target",
            )
    features = [
        FeatureInfo(name, _feature_kind(frame[name]))
        for name in frame.columns
        if name != data.target
    ]
    builtin = _builtin_name(data.uri)
    modality: Modality = BUILTIN_MODALITY.get(builtin, "tabular")
    if data.format == "images":
        modality = "image"
    elif data.format == "text" or any(f.kind == "text" for f in features):
        modality = "text"
    image_shape: list[int] | None = None
    if modality == "image":
        image_shape = (
            list(DIGITS_SHAPE)
            if builtin == "digits" and len(features) == math.prod(DIGITS_SHAPE)
            else _check_image_features(features, data)
        )
    elif modality == "text":
        features = _check_text_features(features, data)
    return DatasetSchema(
        target=data.target,
        task=data.task,
        modality=modality,
        features=features,
        classes=classes,
        image_shape=image_shape,
        source=data.uri,
    )


def _check_image_features(features: list[FeatureInfo], data: DataSource) -> list[int]:
    not_numeric = [f.name for f in features if f.kind != "numeric"]
    if not_numeric:
        raise StepError(
            f"data.format='images' needs numeric pixel columns; {not_numeric[:5]} are not "
            "numeric; select only the pixel columns in data.features",
            field="data.features",
        )
    shape = _image_shape(len(features))
    if shape is None:
        raise StepError(
            f"data.format='images' needs a square image (H*W or 3*H*W pixel columns); "
            f"{len(features)} columns are selected; select the pixel columns in data.features",
            field="data.features",
        )
    return shape


def _check_text_features(features: list[FeatureInfo], data: DataSource) -> list[FeatureInfo]:
    text = [f for f in features if f.kind == "text"]
    if data.format == "text" and not text:
        # the user said text: take a lone string column even if its values are short
        text = [FeatureInfo(f.name, "text") for f in features if f.kind == "categorical"]
    if len(text) != 1 or len(features) != 1:
        raise StepError(
            f"a text dataset is modelled from one text column; data.features selects "
            f"{[f.name for f in features]} (text columns: {[f.name for f in text]}); set "
            "data.features to the one text column",
            field="data.features",
        )
    return text


def fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the column names and every value (row order included)."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# splitting


def split(
    frame: pd.DataFrame, settings: Split, *, target: str, task: str
) -> dict[str, pd.DataFrame]:
    """Seeded train/validation/test split (keys :data:`~kubeloop_pipelines.contract.SPLITS`).
    Classification with ``settings.stratify`` splits each class separately, so every split
    keeps the class ratios (a class of 3 rows still lands in all three splits)."""
    rng = np.random.default_rng(settings.seed)
    positions = np.arange(len(frame))
    if task == "classification" and settings.stratify:
        labels = label_strings(frame[target]).to_numpy()
        groups = [positions[labels == label] for label in sorted(set(labels))]
    else:
        groups = [positions]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for group in groups:
        shuffled = rng.permutation(group)
        n_test = round(len(shuffled) * settings.test)
        n_validation = round(len(shuffled) * settings.validation)
        if len(groups) > 1 and len(shuffled) >= 3:
            # a small class still appears in every split
            n_test, n_validation = max(n_test, 1), max(n_validation, 1)
        parts["test"].append(shuffled[:n_test])
        parts["validation"].append(shuffled[n_test : n_test + n_validation])
        parts["train"].append(shuffled[n_test + n_validation :])
    out: dict[str, pd.DataFrame] = {}
    for name in SPLITS:
        # rows of one split keep a seeded shuffled order, not grouped by class
        chosen = rng.permutation(np.concatenate(parts[name])) if parts[name] else positions[:0]
        out[name] = frame.iloc[chosen].reset_index(drop=True)
    return out
