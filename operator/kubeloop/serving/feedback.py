"""Ground-truth labels fed back by request id, joined to the predictions they are for.

Every answered request is recorded here (``record``) under its request id: the predicted class
index (classification) or value (regression) of each of its rows, for ``ttl_s`` seconds. The
feedback route hands its JSON body to ``submit``::

    {"id": "<request id>", "label": "benign"}           one label (a request of one row)
    {"id": "<request id>", "row": 2, "label": 0}        one row of a request of several rows
    [{"id": ...}, {"id": ...}]                          a batch (at most MAX_BATCH items)

A classification label is a class name of the artifact or its index; a regression label is a
finite number. Each row counts once: the same label again is a ``duplicate`` (200), another
label a ``conflict`` (409, the first stays). A label for an id never seen is ``unknown`` (404),
for a prediction past its TTL ``late`` (410), a malformed one ``invalid`` (400); the message
names the field. A batch answers 200 with one result per item. Every outcome is counted
(``kubeloop_feedback_labels_total{outcome}``); nothing here raises into the route.

Matched labels become the labelled-outcome series (confusion cells, absolute and squared errors,
label delay; see :mod:`kubeloop.contract.serving_metrics`) and go to the label sinks (the
request log). Memory is bounded: at most ``max_entries`` requests and ``max_rows`` rows wait;
older ones are evicted and their unlabelled rows counted by reason.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge, Histogram

from kubeloop.contract import serving_metrics as contract

MAX_BATCH: Final = 1000
MAX_ID_LENGTH: Final = 256
DEFAULT_MAX_ENTRIES: Final = 100_000  # requests waiting for labels
DEFAULT_MAX_ROWS: Final = 1_000_000  # rows waiting for labels, over all those requests
# Up to this many classes every confusion cell is exported from the start at zero (so the
# first label of a cell is not lost to rate()); more classes create their cells when first hit.
PRECREATED_CLASSES: Final = 32
# |error| buckets in the target's own units, 1-2.5-5 steps over 1e-3 .. 5e5.
ABSOLUTE_ERROR_BUCKETS: Final = tuple(float(f"{m}e{e}") for e in range(-3, 6) for m in (1, 2.5, 5))
LABEL_DELAY_BUCKETS: Final = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 14400.0, 43200.0, 86400.0, 259200.0, 604800.0,
)  # fmt: skip

_M, _V = contract.MODEL_LABEL, contract.VERSION_LABEL
PREDICTIONS = Counter(
    contract.FEEDBACK_PREDICTIONS, "Predicted rows a label can be fed back for.", [_M, _V]
)
LABELS = Counter(
    contract.FEEDBACK_LABELS,
    "Labels fed back, one a row, by outcome (matched, duplicate, conflict, late, unknown, "
    "invalid).",
    [_M, _V, contract.OUTCOME_LABEL],
)
PENDING = Gauge(contract.FEEDBACK_PENDING, "Predicted rows waiting for their label.", [_M, _V])
EVICTIONS = Counter(
    contract.FEEDBACK_EVICTIONS,
    "Unlabelled predicted rows given up on: TTL expired, or pushed out by newer ones.",
    [_M, _V, contract.REASON_LABEL],
)
CONFUSION = Counter(
    contract.FEEDBACK_CONFUSION,
    "Labelled classification rows by actual and predicted class (correct: they agree).",
    [_M, _V, contract.ACTUAL_LABEL, contract.PREDICTED_LABEL, contract.CORRECT_LABEL],
)
ABSOLUTE_ERROR = Histogram(
    contract.FEEDBACK_ABSOLUTE_ERROR,
    "Labelled regression rows by |prediction - label| (sum / count is the MAE).",
    [_M, _V],
    buckets=ABSOLUTE_ERROR_BUCKETS,
)
SQUARED_ERROR = Counter(
    contract.FEEDBACK_SQUARED_ERROR,
    "Sum of (prediction - label)^2 over labelled regression rows.",
    [_M, _V],
)
LABEL_DELAY = Histogram(
    contract.FEEDBACK_LABEL_DELAY,
    "Seconds from a prediction to its label.",
    [_M, _V],
    buckets=LABEL_DELAY_BUCKETS,
)

Label = str | float  # a class name, or a regression value
_STATUS: Final = {
    "matched": 200,
    "duplicate": 200,
    "conflict": 409,
    "late": 410,
    "unknown": 404,
    "invalid": 400,
}


class LabelSink(Protocol):
    """Something that keeps matched labels (the request log); must return at once."""

    def record_label(self, request_id: str, row: int, label: Label, at: float) -> None: ...


@dataclass(slots=True)
class _Entry:
    at: float
    predicted: npt.NDArray[Any]  # class index (int) or value (float), one a row
    labels: dict[int, Label] = field(default_factory=dict)  # row -> label, once fed back


@dataclass(frozen=True, slots=True)
class _Outcome:
    outcome: str
    body: dict[str, object]

    @property
    def status(self) -> int:
        return _STATUS[self.outcome]


@dataclass(frozen=True, slots=True)
class _Joined:
    """What joining one label found."""

    outcome: str
    row: int = -1  # -1: not known (the id is not)
    field: str = ""
    error: str = ""
    delay: float = 0.0
    predicted: Any = None

    @classmethod
    def refused(cls, outcome: str, field: str, error: str) -> _Joined:
        """Not joined: ``error`` says why, naming ``field``."""
        return cls(outcome, field=field, error=error)


class _Invalid(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class FeedbackStore:
    """The predictions of one served version waiting for labels, and the labelled outcomes.

    A :class:`~kubeloop.serving.predictor.Recorder` (``record``) and the predictor's
    ``FeedbackHandler`` (``submit``). Thread-safe; both calls are short and never block on I/O.
    """

    def __init__(
        self,
        model: str,
        version: str,
        *,
        task: str,
        classes: Sequence[str] = (),
        ttl_s: float = 3600.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_rows: int = DEFAULT_MAX_ROWS,
        sinks: Sequence[LabelSink] = (),
    ) -> None:
        if ttl_s <= 0 or not math.isfinite(ttl_s):
            raise ValueError(f"feedback_ttl_s={ttl_s!r}: expected a finite number of seconds > 0")
        if max_entries < 1 or max_rows < 1:
            raise ValueError(f"max_entries={max_entries}, max_rows={max_rows}: expected >= 1")
        if task == "classification" and len(classes) < 2:
            raise ValueError(f"classes={list(classes)!r}: classification needs at least 2")
        self.model, self.version, self.task = model, version, task
        self.classes = [str(c) for c in classes] if task == "classification" else []
        self._class_index = {name: i for i, name in enumerate(self.classes)}
        self.ttl_s, self.max_entries, self.max_rows = ttl_s, max_entries, max_rows
        self.sinks = list(sinks)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        # Ids evicted recently and the rows that had been labelled: tells late from unknown
        # and keeps a resent label a duplicate after its prediction is gone.
        self._gone: OrderedDict[str, frozenset[int]] = OrderedDict()
        self._rows_held = 0  # rows of the waiting entries
        self._pending = 0  # of those, rows without a label

        self._predictions = PREDICTIONS.labels(model, version)
        self._outcomes = {o: LABELS.labels(model, version, o) for o in contract.FEEDBACK_OUTCOMES}
        self._evictions = {
            r: EVICTIONS.labels(model, version, r) for r in contract.FEEDBACK_EVICTION_REASONS
        }
        self._delay = LABEL_DELAY.labels(model, version)
        self._cells: dict[tuple[int, int], Any] = {}
        if self.task == "classification" and len(self.classes) <= PRECREATED_CLASSES:
            for a in range(len(self.classes)):
                for p in range(len(self.classes)):
                    self._cell(a, p)
        # Regression: (|error| histogram, squared-error counter).
        self._errors: tuple[Any, Any] | None = (
            None
            if task == "classification"
            else (ABSOLUTE_ERROR.labels(model, version), SQUARED_ERROR.labels(model, version))
        )
        # Read at scrape time, expiring first: TTL evictions are counted without traffic too.
        PENDING.labels(model, version).set_function(self._scrape_pending)

    # --- recording -------------------------------------------------------------------------

    def record(
        self,
        request_id: str,
        rows: npt.NDArray[np.float32],
        outputs: npt.NDArray[np.float32],
        at: float,
    ) -> None:
        """Keep the predicted class or value of each row of an answered request."""
        del rows  # the request log keeps the features; a label needs only the prediction
        out = np.asarray(outputs)
        if self.task == "classification":
            predicted: npt.NDArray[Any] = np.asarray(out.reshape(len(out), -1).argmax(axis=1))
        else:
            predicted = np.array(out, dtype=np.float64).reshape(len(out))
        n = len(predicted)
        if n == 0:
            return
        with self._lock:
            self._expire(at)
            if request_id in self._entries or request_id in self._gone:
                return  # an id reused by its client: the first prediction keeps it
            self._entries[request_id] = _Entry(at, predicted)
            self._rows_held += n
            self._pending += n
            while len(self._entries) > self.max_entries or (
                self._rows_held > self.max_rows and len(self._entries) > 1
            ):
                old_id, old = self._entries.popitem(last=False)
                self._evict(old_id, old, "capacity")
        self._predictions.inc(n)

    async def close(self) -> None:
        """Nothing to flush: waiting predictions die with the process (they are counted)."""
        with self._lock:
            while self._entries:
                old_id, old = self._entries.popitem(last=False)
                self._evict(old_id, old, "expired")

    @property
    def pending(self) -> int:
        """Predicted rows waiting for a label."""
        with self._lock:
            return self._pending

    def expire(self, now: float) -> None:
        """Evict the predictions whose TTL has passed at ``now``."""
        with self._lock:
            self._expire(now)

    def _scrape_pending(self) -> float:
        with self._lock:
            self._expire(time.time())
            return float(self._pending)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            request_id, entry = next(iter(entries.items()))
            if entry.at + self.ttl_s >= now:
                return
            entries.popitem(last=False)
            self._evict(request_id, entry, "expired")

    def _evict(self, request_id: str, entry: _Entry, reason: str) -> None:
        n = len(entry.predicted)
        unlabelled = n - len(entry.labels)
        self._rows_held -= n
        self._pending -= unlabelled
        if unlabelled:
            self._evictions[reason].inc(unlabelled)
        self._gone[request_id] = frozenset(entry.labels)
        while len(self._gone) > self.max_entries:
            self._gone.popitem(last=False)

    # --- feedback --------------------------------------------------------------------------

    def submit(self, payload: object, at: float) -> tuple[int, dict[str, object]]:
        """(HTTP status, JSON body) for one feedback body: one item, or a list of them."""
        if isinstance(payload, list):
            return self._submit_batch(payload, at)
        result = self._submit_one(payload, at)
        return result.status, result.body

    def _submit_batch(self, items: list[object], at: float) -> tuple[int, dict[str, object]]:
        if not items or len(items) > MAX_BATCH:
            self._outcomes["invalid"].inc()
            message = (
                f"the feedback list has {len(items)} items; send 1 to {MAX_BATCH} items of "
                '{"id": ..., "label": ...} (split larger batches)'
            )
            return 400, {"error": message, "field": "body", "status": "invalid"}
        results = [self._submit_one(item, at) for item in items]
        counts = dict.fromkeys(contract.FEEDBACK_OUTCOMES, 0)
        for r in results:
            counts[r.outcome] += 1
        return 200, {
            "results": [{"index": i} | r.body for i, r in enumerate(results)],
            "counts": counts,
        }

    def _submit_one(self, item: object, at: float) -> _Outcome:
        try:
            request_id, row, label = self._parse(item)
        except _Invalid as exc:
            self._outcomes["invalid"].inc()
            return _Outcome("invalid", {"error": str(exc), "field": exc.field, "status": "invalid"})
        joined = self._join(request_id, row, label, at)
        self._outcomes[joined.outcome].inc()
        if joined.outcome == "matched":
            self._delay.observe(max(joined.delay, 0.0))
            self._count_outcome(label, joined.predicted)
            for sink in self.sinks:
                sink.record_label(request_id, joined.row, label, at)
        body: dict[str, object] = {"id": request_id, "status": joined.outcome}
        if joined.row >= 0:
            body["row"] = joined.row
        if joined.error:
            body |= {"field": joined.field, "error": joined.error}
        return _Outcome(joined.outcome, body)

    def _join(self, request_id: str, row: int | None, label: Label, at: float) -> _Joined:
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None and entry.at + self.ttl_s < at:
                del self._entries[request_id]
                self._evict(request_id, entry, "expired")
                entry = None
            if entry is None:
                return self._missing(request_id, row)
            n = len(entry.predicted)
            if row is None and n != 1:
                return _Joined.refused(
                    "invalid",
                    "row",
                    f"row is missing: request {request_id!r} answered {n} rows; give the row "
                    f"(0..{n - 1}) this label is for",
                )
            row = row or 0
            if row >= n:
                return _Joined.refused(
                    "invalid",
                    "row",
                    f"row={row}: request {request_id!r} answered {n} row(s) (0..{n - 1})",
                )
            first = entry.labels.get(row)
            if first is not None:
                if first == label:
                    return _Joined("duplicate", row)
                return _Joined(
                    "conflict",
                    row,
                    field="label",
                    error=f"label={label!r}: row {row} of request {request_id!r} is already "
                    f"labelled {first!r}; the first label stays",
                )
            entry.labels[row] = label
            self._pending -= 1
            return _Joined("matched", row, delay=at - entry.at, predicted=entry.predicted[row])

    def _missing(self, request_id: str, row: int | None) -> _Joined:
        gone = self._gone.get(request_id)
        if gone is None:
            return _Joined.refused(
                "unknown",
                "id",
                f"id={request_id!r}: no prediction with this request id is waiting for a label "
                "(use the id of a response of this model version)",
            )
        if (row or 0) in gone:
            return _Joined("duplicate", row or 0)
        return _Joined.refused(
            "late",
            "id",
            f"id={request_id!r}: the prediction is no longer kept: labels are joined for "
            f"{self.ttl_s:g} s after the prediction (the feedback TTL), while it is among the "
            f"{self.max_entries} newest",
        )

    def _count_outcome(self, label: Label, predicted: Any) -> None:
        if self.task == "classification":
            self._cell(self._class_index[str(label)], int(predicted)).inc()
            return
        error = float(predicted) - float(label)
        if self._errors is not None and math.isfinite(error):  # a NaN prediction has no error
            absolute, squared = self._errors
            absolute.observe(abs(error))
            squared.inc(error * error)

    def _cell(self, actual: int, predicted: int) -> Any:
        cell = self._cells.get((actual, predicted))
        if cell is None:
            cell = CONFUSION.labels(
                self.model,
                self.version,
                self.classes[actual],
                self.classes[predicted],
                "true" if actual == predicted else "false",
            )
            self._cells[(actual, predicted)] = cell
        return cell

    # --- parsing ---------------------------------------------------------------------------

    def _parse(self, item: object) -> tuple[str, int | None, Label]:
        if not isinstance(item, dict):
            raise _Invalid(
                "body",
                'feedback must be a JSON object {"id": <request id>, "label": <label>} (or '
                f"a list of them); got {type(item).__name__}",
            )
        request_id = item.get("id")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_LENGTH:
            raise _Invalid(
                "id",
                f"id={_short(request_id)}: expected the request id of a response (a string of "
                f"1 to {MAX_ID_LENGTH} characters)",
            )
        row = item.get("row")
        if row is not None and (isinstance(row, bool) or not isinstance(row, int) or row < 0):
            raise _Invalid("row", f"row={_short(row)}: expected a row index (an integer >= 0)")
        if "label" not in item:
            raise _Invalid("label", 'label is missing: send the ground truth as "label"')
        return request_id, row, self._label(item["label"])

    def _label(self, value: object) -> Label:
        if self.task == "classification":
            if isinstance(value, str) and value in self._class_index:
                return value
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and 0 <= value < len(self.classes)
            ):
                return self.classes[value]
            shown = ", ".join(repr(c) for c in self.classes[:10])
            more = f", ... ({len(self.classes)} in all)" if len(self.classes) > 10 else ""
            raise _Invalid(
                "label",
                f"label={_short(value)}: expected a class name ({shown}{more}) or its index "
                f"(0..{len(self.classes) - 1})",
            )
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        ):
            return float(value)
        raise _Invalid("label", f"label={_short(value)}: expected a finite number (regression)")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
