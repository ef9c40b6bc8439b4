"""The request log: sampled served rows and their fed-back labels, as Parquet training data.

Layout under the log's URI (``file://``, ``s3://``, ``gs://``; the operator passes one per
deployment under the tenant's prefix, shared by every version and replica)::

    <uri>/predictions/<version>/<first row UTC>_<writer>_<seq>_r<rows>.parquet
    <uri>/labels/<version>/<first label UTC>_<writer>_<seq>_r<rows>.parquet

A predictions file holds ``id`` (the request id), ``row`` (the row's index in its request),
``time``, ``version``, ``features`` (the raw values, a fixed-size list in the order of the
``features`` named in the file's metadata), ``prediction`` (the class name, or the value) and,
for classifiers, ``scores`` (the class probabilities). A labels file holds ``id``, ``row``,
``time`` (when the label came), ``version`` and ``label``. Labels come after their row was
written, so they are a stream of their own, joined to the predictions by (id, row) when read
(``serving/request_log_reader.py``). Both carry the metadata key ``kubeloop.request_log``
(format, model, version, task, features, classes). ``<writer>`` is random per process, so
replicas never write the same name; ``<rows>`` lets retention count rows from a listing alone.

Writing never blocks a request: ``record`` samples (by a hash of the request id, so a label is
logged exactly when its request was), applies a rows-per-second cap, and appends to a bounded
queue; a background thread writes a file every ``rows_per_file`` rows or ``roll_interval_s``
seconds and then removes the oldest files beyond ``max_rows`` rows (per stream, over every
version and writer). A full queue, a failing store and a closed log drop rows and count them
(``kubeloop_request_log_dropped_rows_total{stream, reason}``); nothing raises into a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import fsspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import Counter

from kubeloop.contract import serving_metrics as contract
from kubeloop.serving.request_log_reader import (
    FORMAT,
    METADATA_KEY,
    log_files,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_ROWS: Final = 100_000  # rows accepted but not yet written
DEFAULT_ROWS_PER_FILE: Final = 50_000
DEFAULT_ROLL_INTERVAL_S: Final = 60.0  # a file at least this often while rows come
DEFAULT_MAX_ROWS_PER_S: Final = 1_000.0  # the cap on logged prediction rows (burst: 1 s)
WARN_EVERY_S: Final = 60.0
_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")

ROWS = Counter(
    contract.REQUEST_LOG_ROWS,
    "Rows written to the request log, by stream (predictions, labels).",
    [contract.MODEL_LABEL, contract.VERSION_LABEL, contract.STREAM_LABEL],
)
DROPS = Counter(
    contract.REQUEST_LOG_DROPS,
    "Rows not written to the request log, by stream and reason (sampled_out, over_cap: by "
    "configuration; queue_full, write_failed, closed: lost).",
    [contract.MODEL_LABEL, contract.VERSION_LABEL, contract.STREAM_LABEL, contract.REASON_LABEL],
)


@dataclass(frozen=True, slots=True)
class _Predictions:
    request_id: str
    rows: npt.NDArray[np.float32]
    outputs: npt.NDArray[np.float32]
    at: float


@dataclass(frozen=True, slots=True)
class _Label:
    request_id: str
    row: int
    label: str | float
    at: float


class RequestLog:
    """The request log of one served version (a ``Recorder`` and a feedback ``LabelSink``)."""

    def __init__(
        self,
        uri: str,
        *,
        model: str,
        version: str,
        task: str,
        features: Sequence[str],
        classes: Sequence[str] = (),
        sample: float = 1.0,
        max_rows: int = 1_000_000,
        max_pending_rows: int = DEFAULT_MAX_PENDING_ROWS,
        rows_per_file: int = DEFAULT_ROWS_PER_FILE,
        roll_interval_s: float = DEFAULT_ROLL_INTERVAL_S,
        max_rows_per_s: float = DEFAULT_MAX_ROWS_PER_S,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: fsspec.AbstractFileSystem | None = None,
    ) -> None:
        """Raises ValueError naming the option for values that can never work (a sample
        outside 0..1, an unknown URI scheme); a store that refuses writes is counted instead."""
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"request_log_sample={sample!r}: expected a share from 0 to 1")
        if max_rows < 1 or max_pending_rows < 1 or rows_per_file < 1:
            raise ValueError(
                f"request_log_max_rows={max_rows}, max_pending_rows={max_pending_rows}, "
                f"rows_per_file={rows_per_file}: expected integers >= 1"
            )
        if not roll_interval_s > 0 or not max_rows_per_s > 0:
            raise ValueError(
                f"roll_interval_s={roll_interval_s}, max_rows_per_s={max_rows_per_s}: "
                "expected numbers > 0"
            )
        if filesystem is None:
            try:
                filesystem, root = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
            except (ImportError, ValueError) as exc:
                raise ValueError(
                    f"request_log_uri={uri!r} cannot be opened: {exc} (expected file://, "
                    "s3:// or gs:// with its filesystem installed)"
                ) from exc
        else:
            root = filesystem._strip_protocol(uri)
        self.uri, self.model, self.version, self.task = uri, model, version, task
        self.features = [str(f) for f in features]
        self.classes = [str(c) for c in classes] if task == "classification" else []
        self.sample, self.max_rows, self.max_pending_rows = sample, max_rows, max_pending_rows
        # Retention removes whole files: keep them small beside the cap.
        self.rows_per_file = max(1, min(rows_per_file, max_rows // 4 or 1))
        self.roll_interval_s, self.max_rows_per_s = roll_interval_s, max_rows_per_s
        self._fs = filesystem
        self._root = str(root).rstrip("/")
        self._local = "file" in _protocols(filesystem)
        self._writer_id = uuid.uuid4().hex[:8]
        self._seq = 0
        self._classes_array = np.asarray(self.classes, dtype=object)
        self._metadata = {
            METADATA_KEY: json.dumps(
                {
                    "format": FORMAT,
                    "model": model,
                    "version": version,
                    "task": task,
                    "features": self.features,
                    "classes": self.classes,
                }
            ).encode()
        }

        self._written = {s: ROWS.labels(model, version, s) for s in contract.REQUEST_LOG_STREAMS}
        self._drops = {
            (s, r): DROPS.labels(model, version, s, r)
            for s in contract.REQUEST_LOG_STREAMS
            for r in contract.REQUEST_LOG_DROP_REASONS
        }
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Predictions | _Label] = []
        self._queued_rows = 0  # rows in _queue
        self._pending_rows = 0  # rows accepted and not yet written or dropped
        self._first_queued = 0.0  # monotonic time the oldest queued item came
        self._flush_asked = False
        self._closing = False
        self._tokens, self._refilled = max_rows_per_s, time.monotonic()
        self._warned_at = -math.inf
        self._thread = threading.Thread(
            target=self._run, name=f"request-log-{model}-{version}", daemon=True
        )
        self._thread.start()

    # --- the request side: never blocks --------------------------------------------------

    def sampled(self, request_id: str) -> bool:
        """Whether ``request_id`` is in the sample (the same answer for its label later)."""
        return zlib.crc32(request_id.encode()) < self.sample * 2**32

    def record(
        self,
        request_id: str,
        rows: npt.NDArray[np.float32],
        outputs: npt.NDArray[np.float32],
        at: float,
    ) -> None:
        """Queue the rows of an answered request (or count why not)."""
        n = len(rows)
        if not self.sampled(request_id):
            self._drops["predictions", "sampled_out"].inc(n)
            return
        item = _Predictions(
            request_id,
            np.array(rows, dtype=np.float32, copy=True),
            np.array(outputs, dtype=np.float32, copy=True),
            at,
        )
        with self._cond:
            now = time.monotonic()
            self._tokens = min(
                self.max_rows_per_s, self._tokens + (now - self._refilled) * self.max_rows_per_s
            )
            self._refilled = now
            # A request larger than the burst goes in once the bucket is full (leaving a debt).
            if self._tokens < min(n, self.max_rows_per_s):
                reason = "over_cap"
            else:
                self._tokens -= n
                reason = self._enqueue(item, n, now)
        if reason:
            self._drops["predictions", reason].inc(n)

    def record_label(self, request_id: str, row: int, label: str | float, at: float) -> None:
        """Queue a matched label (only for sampled requests: the others have no row)."""
        if not self.sampled(request_id):
            return
        with self._cond:
            reason = self._enqueue(_Label(request_id, row, label, at), 1, time.monotonic())
        if reason:
            self._drops["labels", reason].inc()

    def _enqueue(self, item: _Predictions | _Label, n: int, now: float) -> str:
        """Append under the lock; the drop reason, or ''."""
        if self._closing:
            return "closed"
        if self._pending_rows + n > self.max_pending_rows:
            return "queue_full"
        if not self._queue:
            self._first_queued = now
            self._cond.notify()  # the writer starts the roll-interval clock
        self._queue.append(item)
        self._queued_rows += n
        self._pending_rows += n
        if self._queued_rows >= self.rows_per_file:
            self._cond.notify()
        return ""

    # --- lifecycle -------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Write what is queued now and wait until every accepted row is written or dropped;
        False if that took longer than ``timeout`` (e.g. a stalled store)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_asked = True
            self._cond.notify_all()
            while self._pending_rows:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued and stop the writer; rows still queued after ``timeout`` are
        counted as ``closed``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            left, self._queue, self._queued_rows = self._queue, [], 0
            self._pending_rows -= sum(_rows(i) for i in left)
        for item in left:
            stream = "labels" if isinstance(item, _Label) else "predictions"
            self._drops[stream, "closed"].inc(_rows(item))
        if self._thread.is_alive():
            log.warning("request log %s: the writer did not stop within %.0f s", self.uri, timeout)

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing:
                    due = self._first_queued + self.roll_interval_s - time.monotonic()
                    if self._queue and (
                        self._flush_asked or due <= 0 or self._queued_rows >= self.rows_per_file
                    ):
                        break
                    if self._flush_asked:  # nothing queued, nothing in flight: flushed
                        self._flush_asked = False
                        self._cond.notify_all()
                    self._cond.wait(due if self._queue else None)
                items, self._queue, self._queued_rows = self._queue, [], 0
                closing, self._flush_asked = self._closing, False
            self._write(
                "predictions",
                [i for i in items if isinstance(i, _Predictions)],
                self._predictions_table,
            )
            self._write("labels", [i for i in items if isinstance(i, _Label)], self._labels_table)
            if closing:
                return  # nothing is queued after closing began (record counts it as closed)

    def _write(self, stream: str, items: Sequence[Any], build: Callable[[Any], Any]) -> None:
        """Write ``items`` as files of about ``rows_per_file`` rows; count what failed."""
        for chunk in _chunks(items, self.rows_per_file):
            try:
                self._write_file(stream, build(chunk), chunk[0].at)
            except Exception as exc:  # the store said no (or a bug): count, warn now and then
                self._warn(f"cannot write {stream} to {self.uri}: {exc!r}")
                self._done(chunk, dropped="write_failed")
                continue
            self._done(chunk)
            self._retain(stream)

    def _done(self, items: Sequence[_Predictions | _Label], *, dropped: str = "") -> None:
        for item in items:
            stream = "labels" if isinstance(item, _Label) else "predictions"
            n = _rows(item)
            if dropped:
                self._drops[stream, dropped].inc(n)
            else:
                self._written[stream].inc(n)
        with self._cond:
            self._pending_rows -= sum(_rows(i) for i in items)
            self._cond.notify_all()

    def _predictions_table(self, items: Sequence[_Predictions]) -> Any:
        counts = np.asarray([len(i.rows) for i in items])
        x = np.concatenate([i.rows.reshape(len(i.rows), -1) for i in items])
        if x.shape[1] != len(self.features):
            raise ValueError(f"rows have {x.shape[1]} values; expected {len(self.features)}")
        outputs = [i.outputs for i in items]
        columns: dict[str, Any] = {
            "id": pa.array(
                np.repeat(np.asarray([i.request_id for i in items], dtype=object), counts)
            ),
            "row": pa.array(np.concatenate([np.arange(c, dtype=np.int32) for c in counts])),
            "time": _timestamps(np.repeat([i.at for i in items], counts)),
            "version": pa.array([self.version] * int(counts.sum())).dictionary_encode(),
            "features": _fixed_lists(x),
        }
        if self.task == "classification":
            scores = np.concatenate([o.reshape(len(o), -1) for o in outputs])
            columns["prediction"] = pa.array(self._classes_array[scores.argmax(axis=1)])
            columns["scores"] = _fixed_lists(scores)
        else:
            values = np.concatenate([o.reshape(len(o)) for o in outputs]).astype(np.float64)
            columns["prediction"] = pa.array(values)
        return pa.table(columns).replace_schema_metadata(self._metadata)

    def _labels_table(self, items: Sequence[_Label]) -> Any:
        labels = [i.label for i in items]
        return pa.table(
            {
                "id": pa.array([i.request_id for i in items], type=pa.string()),
                "row": pa.array([i.row for i in items], type=pa.int32()),
                "time": _timestamps(np.asarray([i.at for i in items])),
                "version": pa.array([self.version] * len(items)).dictionary_encode(),
                "label": pa.array(
                    labels, type=pa.string() if self.task == "classification" else pa.float64()
                ),
            }
        ).replace_schema_metadata(self._metadata)

    def _write_file(self, stream: str, table: Any, first_at: float) -> None:
        self._seq += 1
        stamp = datetime.fromtimestamp(first_at, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        directory = f"{self._root}/{stream}/{_UNSAFE_PATH_CHARS.sub('_', self.version)}"
        name = f"{stamp}_{self._writer_id}_{self._seq:06d}_r{table.num_rows}.parquet"
        self._fs.makedirs(directory, exist_ok=True)
        # Local files appear whole (a rename); an object store's upload does by itself.
        target = f"{directory}/{name}"
        path = f"{directory}/.{name}.tmp" if self._local else target
        with self._fs.open(path, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
        if path != target:
            self._fs.mv(path, target)

    def _retain(self, stream: str) -> None:
        """Remove the oldest files of ``stream`` while it holds more than ``max_rows`` rows
        (the newest file always stays)."""
        try:
            files = sorted(log_files(self._fs, f"{self._root}/{stream}"), key=lambda f: f[0])
            total = sum(rows for _, _, rows in files)
            for _, path, rows in files[:-1]:
                if total <= self.max_rows:
                    break
                # another writer of this deployment may have removed it first
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm(path)
                total -= rows
        except Exception as exc:
            self._warn(f"cannot remove old {stream} files under {self.uri}: {exc!r}")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "request log: %s (dropped rows are counted in %s)",
                message,
                contract.total(contract.REQUEST_LOG_DROPS),
            )


def _rows(item: _Predictions | _Label) -> int:
    return 1 if isinstance(item, _Label) else len(item.rows)


def _chunks(items: Sequence[Any], rows: int) -> list[list[Any]]:
    """Consecutive items in groups of about ``rows`` rows (an item is never split)."""
    out: list[list[Any]] = []
    current: list[Any] = []
    n = 0
    for item in items:
        current.append(item)
        n += _rows(item)
        if n >= rows:
            out.append(current)
            current, n = [], 0
    if current:
        out.append(current)
    return out


def _timestamps(seconds: npt.NDArray[np.float64]) -> Any:
    micros = np.round(np.asarray(seconds, dtype=np.float64) * 1e6).astype(np.int64)
    return pa.array(micros, type=pa.timestamp("us", tz="UTC"))


def _fixed_lists(values: npt.NDArray[Any]) -> Any:
    flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), int(values.shape[1]))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
