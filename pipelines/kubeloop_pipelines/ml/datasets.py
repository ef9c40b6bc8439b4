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

from kubeloop.api.training_run import DataSource, ExtraData, Split, parse_timestamp
from kubeloop_pipelines.contract import SPLITS, Modality, StepError
from kubeloop_pipelines.ml.builtin_datasets import BUILTIN_MODALITY, DIGITS_SHAPE, load_builtin
from kubeloop_pipelines.ml.group_split import group_parts

FeatureKind = Literal["numeric", "categorical", "text"]

# A string column whose values average at least this many words is free text, not a category.
TEXT_MIN_MEAN_WORDS = 3.0
# A numeric classification target with more distinct non-integer values than this is surely
# a regression target given the wrong task.
MAX_FLOAT_CLASSES = 20


# --------------------------------------------------------------------------------------------
# reading tables


def table_format(uri: str, fmt: str, *, where: str = "data") -> Literal["csv", "parquet"]:
    """The file format to read ``uri`` with: explicit csv/parquet, else from the extension
    (``images`` and ``text`` name the modality; their files are csv or parquet tables too).
    ``where`` is the spec path of the source (``data`` or ``data.extra[i]``)."""
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
        f"{where}.format={fmt!r} cannot tell how to read {uri}: the name ends in neither .csv "
        f"nor .parquet; set {where}.format to 'csv' or 'parquet'",
        field=f"{where}.format",
    )


def read_table(
    uri: str,
    fmt: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    where: str = "data",
) -> pd.DataFrame:
    """Read a csv or parquet table from a ``file://``, ``s3://`` or ``gs://`` URI (fsspec;
    credentials from ``storage_options`` or the environment). Unreadable, missing or empty data
    raises :class:`StepError` on ``<where>.uri`` naming the URI and the reason."""
    import fsspec

    kind = table_format(uri, fmt, where=where)
    options = dict(storage_options or {})
    field_path = f"{where}.uri"
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
            f"{field_path}={uri} does not exist; point it at a {kind} file", field=field_path
        ) from None
    except PermissionError as exc:
        raise StepError(
            f"{field_path}={uri} cannot be read: permission denied ({exc}); check "
            "data.credentialsSecret",
            field=field_path,
        ) from exc
    except pd.errors.EmptyDataError:
        raise StepError(
            f"{field_path}={uri} is empty: the file holds no rows", field=field_path
        ) from None
    except (ValueError, pd.errors.ParserError, OSError, UnicodeDecodeError) as exc:
        # pyarrow's errors derive from ValueError/OSError; a network hiccup may heal
        transient = isinstance(exc, OSError) and not isinstance(exc, IsADirectoryError)
        raise StepError(
            f"{field_path}={uri} cannot be read as {kind}: {exc}",
            field=field_path,
            permanent=not transient,
        ) from exc
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise StepError(
            f"{field_path}={uri} is empty: it holds {frame.shape[0]} rows and {frame.shape[1]} "
            "columns; expected a header and at least one row",
            field=field_path,
        )
    frame.columns = [str(c) for c in frame.columns]
    return frame


def sources(data: DataSource) -> list[tuple[str, ExtraData]]:
    """(spec path, source) of every source of rows, the main one first: ``data``, then
    ``data.extra[0]``, …"""
    main = ExtraData(uri=data.uri, format=data.format, since=data.since)
    return [("data", main), *((f"data.extra[{i}]", e) for i, e in enumerate(data.extra))]


def load_data(
    data: DataSource, *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The whole table ``data.uri`` points at (a built-in dataset or a file; of a request log,
    the rows served from ``data.since`` on). The extra sources: :func:`load_table`."""
    return load_source(data, sources(data)[0][1], storage_options=storage_options)


def load_source(
    data: DataSource,
    source: ExtraData,
    *,
    where: str = "data",
    features: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The whole table of one source (``where`` is its spec path, for errors); a request log
    picks ``features`` by name (default ``data.features``, else its served signature)."""
    if source.since is not None and source.format != "requestLog":
        raise StepError(
            f"{where}.since={source.since} selects request log rows by serving time; "
            f"{where}.format is {source.format!r}: set it to requestLog or remove since",
            field=f"{where}.since",
        )
    if source.uri.startswith("builtin://"):
        try:
            return load_builtin(source.uri.removeprefix("builtin://"))
        except StepError as exc:
            if where == "data":
                raise
            text = exc.message.replace("data.uri=", f"{where}.uri=", 1)
            raise StepError(text, field=f"{where}.uri") from exc
    if source.format == "requestLog":
        return load_request_log(
            data,
            source=source,
            where=where,
            features=features,
            storage_options=storage_options,
        )
    return read_table(source.uri, source.format, storage_options=storage_options, where=where)


def load_request_log(
    data: DataSource,
    *,
    source: ExtraData | None = None,
    where: str = "data",
    features: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """A serving request log (``format: requestLog``) as a table: one row a served row (from
    ``since`` on), the features in the served signature's order (or ``features``', default
    ``data.features``), then the fed-back label as the target column ``data.target`` (null
    where no label came; ingest drops those). ``source`` defaults to the main one."""
    from kubeloop.serving.request_log_reader import RequestLogError, read_request_log

    source = source or sources(data)[0][1]
    uri, field_path = source.uri, f"{where}.uri"
    since = parse_timestamp(source.since) if source.since is not None else None
    chosen = list(features) if features is not None else list(data.features)
    try:
        log = read_request_log(
            uri, features=chosen or None, since=since, storage_options=storage_options
        )
    except RequestLogError as exc:
        if exc.field == "features" and where != "data":
            raise StepError(
                f"{field_path}={uri} lacks columns the main table has: {exc.missing}; {exc}",
                field=field_path,
            ) from exc
        raise StepError(
            str(exc), field=field_path if exc.field == "uri" else f"data.{exc.field}"
        ) from exc
    except FileNotFoundError:
        raise StepError(
            f"{field_path}={uri} does not exist; point it at a ModelDeployment's request log",
            field=field_path,
        ) from None
    except PermissionError as exc:
        raise StepError(
            f"{field_path}={uri} cannot be read: permission denied ({exc}); check "
            "data.credentialsSecret",
            field=field_path,
        ) from exc
    except (ValueError, OSError) as exc:  # pyarrow's errors derive from these
        raise StepError(
            f"{field_path}={uri} cannot be read as a request log: {exc}",
            field=field_path,
            permanent=not isinstance(exc, OSError),
        ) from exc
    if data.target in log.features:
        raise StepError(
            f"data.target={data.target!r} is a feature of the request log {uri}; name the "
            f"label column something else (features: {_preview(log.features)})",
            field="data.target",
        )
    if log.task != data.task:
        raise StepError(
            f"data.task={data.task!r}, but the request log is of a {log.task} model "
            f"({field_path}={uri}); its labels are "
            f"{'class names' if log.task == 'classification' else 'numbers'}",
            field="data.task",
        )
    frame = log.frame.loc[:, [*log.features, "label"]].rename(columns={"label": data.target})
    frame.columns = [str(c) for c in frame.columns]
    return frame


@dataclass
class SourceRows:
    """What one source added to the table (``schema.json``'s ``sources``)."""

    where: str  # its spec path: data, data.extra[0], …
    uri: str
    format: str
    since: str | None
    rows: int  # rows read
    labelled: int  # of them, rows with a target value

    def to_json(self) -> dict[str, Any]:
        return {
            "field": self.where,
            "uri": self.uri,
            "format": self.format,
            "since": self.since,
            "rows": self.rows,
            "labelled": self.labelled,
        }


@dataclass
class Table:
    """Every source's rows, one table: the main source's selected columns (features, then
    the target) and, appended in ``data.extra`` order, each extra source's same columns."""

    frame: pd.DataFrame
    sources: list[SourceRows]
    columns_read: int  # columns of the main source before the selection


def load_table(data: DataSource, *, storage_options: Mapping[str, Any] | None = None) -> Table:
    """Read ``data.uri`` and every ``data.extra`` source and append them (before any split).

    An extra source must hold every selected column of the main table (in any order; its other
    columns are dropped) with the same kind of values; otherwise :class:`StepError` on
    ``data.extra[i].uri`` names the missing or mismatched columns. Class labels are compared as
    text, so ``1`` in a csv and ``"1"`` fed back to a request log are the same class."""
    (main_where, main), *extras = sources(data)
    main_frame = load_source(data, main, where=main_where, storage_options=storage_options)
    selected = select_columns(main_frame, data)
    columns = [str(c) for c in selected.columns]
    features = columns[:-1]
    parts = [selected]
    for where, source in extras:
        frame = load_source(
            data, source, where=where, features=features, storage_options=storage_options
        )
        parts.append(_aligned(frame, selected, where=where, uri=source.uri))
    shares = [
        SourceRows(
            where=where,
            uri=source.uri,
            format=source.format,
            since=source.since,
            rows=len(part),
            labelled=int(part[data.target].notna().sum()),
        )
        for (where, source), part in zip(sources(data), parts, strict=True)
    ]
    if len(parts) > 1 and data.task == "classification":
        parts = _labels_as_text(parts, data.target)
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else selected
    return Table(frame=frame, sources=shares, columns_read=int(main_frame.shape[1]))


def _aligned(frame: pd.DataFrame, main: pd.DataFrame, *, where: str, uri: str) -> pd.DataFrame:
    """``frame``'s columns of the main table, in its order, or a StepError naming what is
    missing or holds another kind of value."""
    columns = [str(c) for c in main.columns]
    frame = frame.rename(columns=str)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise StepError(
            f"{where}.uri={uri} lacks columns the main table (data.uri) has: "
            f"{_preview(missing)}; it has {_preview(list(frame.columns))}",
            field=f"{where}.uri",
        )
    aligned = frame.loc[:, columns]
    mismatched = [
        c
        for c in columns[:-1]
        if _numeric(main[c]) != _numeric(aligned[c])
        and not (main[c].isna().all() or aligned[c].isna().all())
    ]
    if mismatched:
        raise StepError(
            f"{where}.uri={uri} holds other kinds of values than data.uri in columns "
            f"{_preview(mismatched)} (numbers in one, text in the other)",
            field=f"{where}.uri",
        )
    return aligned.reset_index(drop=True)


def _numeric(column: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column))


def _labels_as_text(parts: list[pd.DataFrame], target: str) -> list[pd.DataFrame]:
    """Class labels of sources whose target columns differ in type, all as
    :func:`label_strings` text (nulls stay null)."""
    if len({str(p[target].dtype) for p in parts}) == 1:
        return parts
    out = []
    for part in parts:
        labels = part[target].astype(object)
        present = labels.notna()
        labels.loc[present] = label_strings(part.loc[present, target])
        out.append(part.assign(**{target: labels}))
    return out


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
    sha256: str = ""  # of the whole table, every source's rows (see fingerprint)
    rows: dict[str, int] = field(default_factory=dict)
    # what each source added (SourceRows.to_json); empty in layouts written before extra
    sources: list[dict[str, Any]] = field(default_factory=list)
    # data.groupColumn: kept in the splits beside the features, never one of them ('' = none)
    group_column: str = ""

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
            "sources": [dict(source) for source in self.sources],
            "group_column": self.group_column,
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
            sources=[dict(source) for source in value.get("sources") or []],
            group_column=str(value.get("group_column") or ""),
        )


def _preview(values: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", … ({len(values)} in all)" if len(values) > limit else "")


def select_columns(frame: pd.DataFrame, data: DataSource) -> pd.DataFrame:
    """The selected features (``data.features``, or every column but the target and
    ``data.groupColumn``), the group column if any, and the target, in that order; wrong names
    raise :class:`StepError` listing the columns there are."""
    columns = [str(c) for c in frame.columns]
    if data.target not in columns:
        raise StepError(
            f"data.target={data.target!r} is not a column of {data.uri}; available columns: "
            f"{_preview(columns)}",
            field="data.target",
        )
    group = [data.group_column] if data.group_column is not None else []
    if group and group[0] not in columns:
        raise StepError(
            f"data.groupColumn={group[0]!r} is not a column of {data.uri}; available columns: "
            f"{_preview(columns)}",
            field="data.groupColumn",
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
        # the group id says which query a row belongs to, not what it is: never a feature
        features = [c for c in columns if c != data.target and c not in group]
    if not features:
        raise StepError(
            f"{data.uri} has no column besides the target {data.target!r}"
            + (f" and the group column {group[0]!r}" if group else "")
            + "; add feature columns",
            field="data.features",
        )
    return frame.loc[:, [*features, *group, data.target]]


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
        if name not in (data.target, data.group_column)
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
        group_column=data.group_column or "",
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
    frame: pd.DataFrame, settings: Split, *, target: str, task: str, group_column: str = ""
) -> dict[str, pd.DataFrame]:
    """Seeded train/validation/test split (keys :data:`~kubeloop_pipelines.contract.SPLITS`).
    With ``group_column`` (data.groupColumn) whole groups go to one split each (see
    ml/group_split.py), so a query's rows are never both trained on and ranked in test.
    Otherwise classification with ``settings.stratify`` splits each class separately, so every
    split keeps the class ratios (a class of 3 rows still lands in all three splits)."""
    rng = np.random.default_rng(settings.seed)
    positions = np.arange(len(frame))
    if group_column:
        parts_of_groups = group_parts(frame[group_column], settings, rng, column=group_column)
        return _shuffled_splits(frame, parts_of_groups, rng)
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
    return _shuffled_splits(frame, parts, rng)


def _shuffled_splits(
    frame: pd.DataFrame, parts: dict[str, list[np.ndarray]], rng: np.random.Generator
) -> dict[str, pd.DataFrame]:
    out: dict[str, pd.DataFrame] = {}
    for name in SPLITS:
        # rows of one split keep a seeded shuffled order, not grouped by class or group
        chosen = (
            rng.permutation(np.concatenate(parts[name]))
            if parts[name]
            else np.arange(len(frame))[:0]
        )
        out[name] = frame.iloc[chosen].reset_index(drop=True)
    return out
