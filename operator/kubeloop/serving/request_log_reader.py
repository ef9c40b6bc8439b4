"""Reading a request log back (the layout: ``serving/request_log.py``): predictions and the
labels fed back, joined by (id, row) — what the pipeline's ingest step reads as a dataset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import pandas as pd

FORMAT: Final = 1
METADATA_KEY: Final = b"kubeloop.request_log"
PREDICTIONS_DIR: Final = "predictions"
LABELS_DIR: Final = "labels"
NAME: Final = re.compile(
    r"^(?P<time>\d{8}T\d{6}\.\d{6}Z)_(?P<writer>[0-9a-f]+)_\d+_r(?P<rows>\d+)\.parquet$"
)


def log_files(fs: fsspec.AbstractFileSystem, directory: str) -> list[tuple[str, str, int]]:
    """(file name, path, rows) of every finished log file under ``directory``."""
    try:
        paths = fs.find(directory)
    except FileNotFoundError:
        return []
    out = []
    for path in paths:
        match = NAME.match(str(path).rsplit("/", 1)[-1])
        if match:
            out.append((match.group(0), str(path), int(match.group("rows"))))
    return out


class RequestLogError(ValueError):
    """The URI holds no readable request log; the message says why. ``field`` is the part of
    the ask that is wrong (``uri`` or ``features``); ``missing``, for ``features``, the asked
    features the newest file lacks."""

    def __init__(self, message: str, *, field: str = "uri", missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.missing = list(missing)


@dataclass
class RequestLogData:
    """A request log read back: ``frame`` has ``id``, ``row``, ``time``, ``version``, one
    column a feature (in ``features`` order), ``prediction``, ``label`` (null until fed back)
    and ``label_time``; one row a served row, the first answer kept where an id came twice."""

    frame: pd.DataFrame
    features: list[str]
    task: str
    classes: list[str]
    skipped_rows: int  # rows (at or after ``since``) of files that lack one of ``features``

    @property
    def labelled(self) -> pd.DataFrame:
        return self.frame.loc[self.frame["label"].notna()].reset_index(drop=True)


def read_request_log(
    uri: str,
    *,
    features: Sequence[str] | None = None,
    since: datetime | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> RequestLogData:
    """Join a request log's predictions and labels by (id, row).

    ``features`` picks and orders the feature columns; by default those of the newest file
    (the served signature). Rows of files without one of them (an older version with another
    signature) are skipped and counted. ``since`` (timezone-aware) keeps only the rows served
    at or after it: a row's ``time`` is when it was answered (the first answer, where an id
    came twice), compared in UTC at the log's microsecond resolution. Raises
    :class:`RequestLogError` when the URI holds no predictions or a file is not a request log
    file, ``ValueError`` for a ``since`` without a timezone, and the filesystem's own errors
    (``FileNotFoundError``, ``PermissionError``, ``OSError``) when it cannot be read.
    """
    import pandas as pd

    if since is not None and since.utcoffset() is None:
        raise ValueError(f"since={since.isoformat()} has no timezone; pass an aware datetime")
    start = None if since is None else pd.Timestamp(since).tz_convert(UTC)
    fs, root = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    root = str(root).rstrip("/")
    prediction_files = sorted(log_files(fs, f"{root}/{PREDICTIONS_DIR}"))
    if not prediction_files:
        raise RequestLogError(
            f"{uri} holds no request log: no Parquet files under {PREDICTIONS_DIR}/ (is it the "
            "request log URI of a deployment that has served requests?)"
        )
    tables = [(path, _read(fs, path)) for _, path, _ in prediction_files]
    newest = _meta(tables[-1][0], tables[-1][1])
    chosen = [str(f) for f in features] if features else list(newest["features"])
    frames, skipped = [], 0
    for path, table in tables:
        meta = _meta(path, table)
        index = {name: i for i, name in enumerate(meta["features"])}
        if any(name not in index for name in chosen):
            skipped += _rows_since(table, since)
            continue
        width = len(meta["features"])
        x = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, width)
        frame = pd.DataFrame(
            {
                "id": table.column("id").to_pandas(),
                "row": table.column("row").to_pandas(),
                "time": table.column("time").to_pandas(),
                "version": table.column("version").to_pandas().astype(str),
            }
        )
        picked = x[:, [index[name] for name in chosen]]
        frame = pd.concat(
            [
                frame,
                pd.DataFrame(picked, columns=chosen),
                table.column("prediction").to_pandas().rename("prediction"),
            ],
            axis=1,
        )
        frames.append(frame)
    if not frames:
        raise RequestLogError(
            f"{uri}: no predictions file has the features {chosen}; the newest has "
            f"{newest['features']}",
            field="features",
            missing=[name for name in chosen if name not in newest["features"]],
        )
    rows = pd.concat(frames, ignore_index=True).sort_values("time", kind="stable")
    rows = rows.drop_duplicates(["id", "row"], keep="first")
    if start is not None:
        # after keeping the first answer: a retried request first served earlier stays out
        rows = rows.loc[rows["time"] >= start]
    labels = _read_labels(fs, f"{root}/{LABELS_DIR}", newest["task"])
    joined = rows.merge(labels, on=["id", "row"], how="left", validate="one_to_one")
    return RequestLogData(
        frame=joined.reset_index(drop=True),
        features=chosen,
        task=str(newest["task"]),
        classes=[str(c) for c in newest.get("classes") or []],
        skipped_rows=skipped,
    )


def _rows_since(table: Any, since: datetime | None) -> int:
    """Rows of a predictions table served at or after ``since`` (all rows without one)."""
    if since is None:
        return int(table.num_rows)
    start = pa.scalar(since.astimezone(UTC), type=pa.timestamp("us", tz="UTC"))
    return int(pc.sum(pc.greater_equal(table.column("time"), start)).as_py() or 0)


def _read(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def _meta(path: str, table: Any) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RequestLogError(f"{path} is not a request log file (format {FORMAT}): {raw!r}")
    return meta


def _read_labels(fs: fsspec.AbstractFileSystem, directory: str, task: str) -> pd.DataFrame:
    import pandas as pd

    frames = []
    for _, path, _ in sorted(log_files(fs, directory)):
        table = _read(fs, path)
        _meta(path, table)
        frames.append(
            pd.DataFrame(
                {
                    "id": table.column("id").to_pandas(),
                    "row": table.column("row").to_pandas(),
                    "label": table.column("label").to_pandas(),
                    "label_time": table.column("time").to_pandas(),
                }
            )
        )
    if not frames:
        dtype = object if task == "classification" else np.float64
        return pd.DataFrame(
            {
                "id": pd.Series(dtype=object),
                "row": pd.Series(dtype=np.int32),
                "label": pd.Series(dtype=dtype),
                "label_time": pd.Series(dtype="datetime64[us, UTC]"),
            }
        )
    labels = pd.concat(frames, ignore_index=True).sort_values("label_time", kind="stable")
    return labels.drop_duplicates(["id", "row"], keep="first")
