"""The request log (serving/request_log.py) on real files: what it writes, how labels join
when read, sampling, the rows-per-second cap, rotation, retention, and that a stalled, full or
refusing store is counted and never blocks or raises into a request.

The one fake is at the storage boundary: ``StalledFileSystem``, a real local filesystem whose
writes hang until released (an object store that stopped answering)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from prometheus_client import REGISTRY

from kubeloop.serving.request_log import RequestLog
from kubeloop.serving.request_log_reader import METADATA_KEY, RequestLogError, read_request_log

FEATURES = ["f0", "f1", "f2"]
CLASSES = ["no", "yes"]
NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_[0-9a-f]{8}_\d{6}_r\d+\.parquet$")


class StalledFileSystem(LocalFileSystem):  # type: ignore[misc]
    """Boundary fake: a local filesystem whose writes hang until ``release`` is set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()
        self.stalled = threading.Event()

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode:
            self.stalled.set()
            self.release.wait(60)
        return super().open(path, mode, **kwargs)


def new_log(uri: str, **options: Any) -> RequestLog:
    """A classification request log under a fresh model name (its counters start at 0)."""
    settings: dict[str, Any] = {
        "model": f"log-{uuid.uuid4().hex[:8]}",
        "version": "v1",
        "task": "classification",
        "features": FEATURES,
        "classes": CLASSES,
    }
    return RequestLog(uri, **(settings | options))


def counted(log: RequestLog, stream: str, reason: str = "") -> float:
    labels = {"model": log.model, "version": log.version, "stream": stream}
    if reason:
        got = REGISTRY.get_sample_value(
            "kubeloop_request_log_dropped_rows_total", labels | {"reason": reason}
        )
    else:
        got = REGISTRY.get_sample_value("kubeloop_request_log_rows_total", labels)
    assert got is not None
    return got


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start * 3, (start + n) * 3, dtype=np.float32).reshape(n, 3)


def scores(n: int, positive: bool = True) -> np.ndarray:
    p = 0.8 if positive else 0.2
    return np.tile(np.array([[1 - p, p]], np.float32), (n, 1))


def files(root: Path, stream: str = "predictions") -> list[Path]:
    return sorted((root / stream).rglob("*.parquet"), key=lambda p: p.name)


def file_rows(paths: list[Path]) -> int:
    return sum(pq.read_metadata(p).num_rows for p in paths)


def test_rows_and_labels_are_written_and_joined_by_id_when_read(tmp_path: Path) -> None:
    log = new_log(f"file://{tmp_path}")
    log.record("a", rows(1), scores(1), 1_700_000_000.0)
    log.record("b", rows(2, 1), scores(2, positive=False), 1_700_000_001.0)
    log.record("c", rows(1, 3), scores(1), 1_700_000_002.0)
    log.record_label("b", 1, "yes", 1_700_000_050.0)
    log.record_label("b", 1, "no", 1_700_000_060.0)  # a later one for the same row: first wins
    log.record_label("a", 0, "no", 1_700_000_070.0)
    log.record_label("zzz", 0, "no", 1_700_000_070.0)  # a label whose row is not in the log
    assert log.flush()
    log.stop()

    (predictions,) = files(tmp_path)
    assert NAME.match(predictions.name)
    assert predictions.parent == tmp_path / "predictions" / "v1"
    assert predictions.name.startswith("20231114T221320.000000Z_")  # the first row's UTC time
    assert predictions.name.endswith("_r4.parquet")
    table = pq.read_table(predictions)
    assert table.column_names == [
        "id",
        "row",
        "time",
        "version",
        "features",
        "prediction",
        "scores",
    ]
    assert METADATA_KEY in table.schema.metadata
    assert len(files(tmp_path, "labels")) == 1

    data = read_request_log(f"file://{tmp_path}")
    frame = data.frame
    assert (data.features, data.task, data.classes, data.skipped_rows) == (
        FEATURES, "classification", CLASSES, 0,
    )  # fmt: skip
    assert list(zip(frame["id"], frame["row"], strict=True)) == [
        ("a", 0), ("b", 0), ("b", 1), ("c", 0),
    ]  # fmt: skip
    np.testing.assert_array_equal(frame[FEATURES].to_numpy(), rows(4))
    assert list(frame["prediction"]) == ["yes", "no", "no", "yes"]
    assert list(frame["version"]) == ["v1"] * 4
    assert frame["label"].isna().tolist() == [False, True, False, True]
    assert (frame["label"].iloc[0], frame["label"].iloc[2]) == ("no", "yes")
    assert len(data.labelled) == 2
    assert counted(log, "predictions") == 4
    assert counted(log, "labels") == 4


def test_a_regression_log_keeps_values_and_numeric_labels(tmp_path: Path) -> None:
    log = new_log(f"file://{tmp_path}", task="regression", classes=[])
    log.record("r", rows(2), np.array([1.5, -2.0], np.float32), time.time())
    log.record_label("r", 1, -1.25, time.time())
    log.stop()

    data = read_request_log(f"file://{tmp_path}")
    assert data.frame["prediction"].tolist() == [1.5, -2.0]
    assert data.frame["label"].isna().tolist() == [True, False]
    assert data.frame["label"].iloc[1] == -1.25
    assert "scores" not in pq.read_table(files(tmp_path)[0]).column_names


def test_versions_with_other_features_are_read_by_name(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}"
    old = new_log(uri, version="v1")  # features f0, f1, f2
    old.record("old", rows(1), scores(1), 1_700_000_000.0)
    old.stop()
    new = new_log(uri, version="v2", features=["f2", "f0"])
    new.record("new", np.array([[20.0, 0.5]], np.float32), scores(1), 1_700_000_100.0)
    new.stop()

    newest = read_request_log(uri)  # the newest file's signature, v1's rows picked by name
    assert newest.features == ["f2", "f0"]
    assert newest.frame[["f2", "f0"]].to_numpy().tolist() == [[2.0, 0.0], [20.0, 0.5]]
    assert newest.frame["version"].tolist() == ["v1", "v2"]

    only_v1 = read_request_log(uri, features=["f1"])
    assert only_v1.frame["id"].tolist() == ["old"]
    assert only_v1.skipped_rows == 1
    with pytest.raises(RequestLogError, match="no predictions file has the features") as info:
        read_request_log(uri, features=["unknown"])
    assert info.value.field == "features"


def test_sampling_is_by_request_id_and_labels_follow_it(tmp_path: Path) -> None:
    log = new_log(f"file://{tmp_path}", sample=0.3, max_rows_per_s=1e6)
    ids = [f"req-{i}" for i in range(2000)]
    for i, request_id in enumerate(ids):
        log.record(request_id, rows(1, i), scores(1), time.time())
        log.record_label(request_id, 0, "yes", time.time())
    log.stop()

    kept = [i for i in ids if log.sampled(i)]
    assert 0.25 < len(kept) / len(ids) < 0.35
    again = new_log(f"file://{tmp_path}/other", sample=0.3)
    assert [i for i in ids if again.sampled(i)] == kept  # the same ids in every replica
    again.stop()
    data = read_request_log(f"file://{tmp_path}")
    assert data.frame["id"].tolist() == kept
    assert data.frame["label"].notna().all()
    assert counted(log, "predictions", "sampled_out") == len(ids) - len(kept)
    assert counted(log, "labels") == len(kept)
    assert new_log(f"file://{tmp_path}/none", sample=0.0).sampled("any") is False


def test_rows_beyond_the_rate_cap_are_counted(tmp_path: Path) -> None:
    log = new_log(f"file://{tmp_path}", max_rows_per_s=20)
    for i in range(200):
        log.record(f"q{i}", rows(1, i), scores(1), time.time())
    log.record("big", rows(50), scores(50), time.time())  # larger than the burst: refused
    log.stop()

    written = counted(log, "predictions")
    assert 20 <= written <= 30  # the burst, and what refilled meanwhile
    assert counted(log, "predictions", "over_cap") == 250 - written


def test_a_full_queue_counts_drops_and_never_blocks(tmp_path: Path) -> None:
    store = StalledFileSystem(skip_instance_cache=True)
    log = new_log(
        f"file://{tmp_path}", filesystem=store, max_pending_rows=100, rows_per_file=10,
        max_rows_per_s=1e9,
    )  # fmt: skip
    now = time.time()
    for i in range(10):  # a file's worth: the writer takes them and hangs in the store
        log.record(f"first-{i}", rows(1, i), scores(1), now)
    assert store.stalled.wait(10)

    took = []
    for i in range(2000):
        start = time.perf_counter()
        log.record(f"more-{i}", rows(1, i), scores(1), now)
        took.append(time.perf_counter() - start)
    assert log.flush(timeout=0.2) is False  # the store still hangs

    median, p99 = np.percentile(took, [50, 99])
    assert median < 50e-6, f"median {median * 1e6:.1f} µs"
    assert p99 < 1e-3, f"p99 {p99 * 1e6:.1f} µs"
    assert counted(log, "predictions", "queue_full") == 2000 - 90  # 100 pending at most
    store.release.set()
    assert log.flush()
    log.stop()
    assert counted(log, "predictions") == 100
    assert file_rows(files(tmp_path)) == 100


def test_files_rotate_by_rows_and_by_time(tmp_path: Path) -> None:
    by_rows = new_log(f"file://{tmp_path}/rows", rows_per_file=5)
    for i in range(23):
        by_rows.record(f"r{i}", rows(1, i), scores(1), time.time())
    by_rows.stop()
    sizes = [pq.read_metadata(p).num_rows for p in files(tmp_path / "rows")]
    assert sum(sizes) == 23
    assert max(sizes) <= 5
    assert len(sizes) >= 5

    by_time = new_log(f"file://{tmp_path}/time", roll_interval_s=0.2)
    by_time.record("t", rows(1), scores(1), time.time())
    deadline = time.monotonic() + 10
    while not files(tmp_path / "time") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert file_rows(files(tmp_path / "time")) == 1  # written without a flush
    by_time.stop()


def test_retention_keeps_the_newest_rows_of_every_writer(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}"
    first = new_log(uri, max_rows=20, version="v1")  # files of at most 20 // 4 = 5 rows
    assert first.rows_per_file == 5
    t0 = 1_700_000_000.0
    for i in range(40):
        first.record(f"a{i}", rows(1, i), scores(1), t0 + i)
        first.record_label(f"a{i}", 0, "yes", t0 + i + 0.5)
        if i % 5 == 4:
            assert first.flush()
    first.stop()
    kept = read_request_log(uri).frame["id"].tolist()
    assert kept == [f"a{i}" for i in range(20, 40)]
    assert file_rows(files(tmp_path, "labels")) == 20

    # Another writer (a canary version, or another replica) shares the cap over the stream.
    second = new_log(uri, max_rows=20, version="v2")
    for i in range(10):
        second.record(f"b{i}", rows(1, i), scores(1), t0 + 100 + i)
    second.stop()
    assert read_request_log(uri).frame["id"].tolist() == [
        *(f"a{i}" for i in range(30, 40)),
        *(f"b{i}" for i in range(10)),
    ]
    assert file_rows(files(tmp_path)) == 20


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot write in: mode 0555, and immutable (chattr +i) when the
    tests run as root, whom modes do not stop."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        immutable = (
            subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode
            == 0
        )
    try:
        probe = path / "probe"
        with contextlib.suppress(OSError):
            probe.touch()
        if probe.exists():
            probe.unlink()
            pytest.skip("cannot make a read-only directory here (root without chattr +i)")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        path.chmod(0o755)


def test_a_read_only_directory_is_counted_as_dropped_rows(read_only_dir: Path) -> None:
    log = new_log(f"file://{read_only_dir}/log")
    for i in range(5):
        log.record(f"ro-{i}", rows(1, i), scores(1), time.time())  # never raises
    log.record_label("ro-0", 0, "yes", time.time())
    assert log.flush()
    log.stop()

    assert counted(log, "predictions", "write_failed") == 5
    assert counted(log, "labels", "write_failed") == 1
    assert counted(log, "predictions") == 0
    assert list(read_only_dir.iterdir()) == []


def test_a_path_through_a_file_is_counted_as_dropped_rows(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the log's directory should be")
    log = new_log(f"file://{tmp_path}/not-a-dir/log")
    log.record("x", rows(3), scores(3), time.time())
    assert log.flush()
    log.stop()
    assert counted(log, "predictions", "write_failed") == 3


async def test_close_writes_what_is_queued_and_later_rows_count_as_closed(
    tmp_path: Path,
) -> None:
    log = new_log(f"file://{tmp_path}", roll_interval_s=3600)
    log.record("before", rows(2), scores(2), time.time())
    await log.close()
    log.record("after", rows(1), scores(1), time.time())
    log.record_label("before", 0, "yes", time.time())

    assert file_rows(files(tmp_path)) == 2
    assert counted(log, "predictions", "closed") == 1
    assert counted(log, "labels", "closed") == 1


def test_settings_that_can_never_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"request_log_sample=1\.5"):
        new_log(f"file://{tmp_path}", sample=1.5)
    with pytest.raises(ValueError, match="request_log_max_rows=0"):
        new_log(f"file://{tmp_path}", max_rows=0)
    with pytest.raises(ValueError, match="request_log_uri='nosuch://bucket/log'"):
        new_log("nosuch://bucket/log")


def test_reading_what_is_not_a_request_log_says_so(tmp_path: Path) -> None:
    with pytest.raises(RequestLogError, match="no Parquet files under predictions/"):
        read_request_log(f"file://{tmp_path}")
    stray = tmp_path / "predictions" / "v1"
    stray.mkdir(parents=True)
    log = new_log(f"file://{tmp_path}")
    log.record("x", rows(1), scores(1), time.time())
    log.stop()
    (written,) = files(tmp_path)
    table = pq.read_table(written)
    pq.write_table(table.replace_schema_metadata({}), written)
    with pytest.raises(RequestLogError, match="is not a request log file"):
        read_request_log(f"file://{tmp_path}")


def test_since_keeps_the_rows_served_from_then_on_compared_in_utc(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}"
    t0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    log = new_log(uri, rows_per_file=2)  # several files, so the filter is not per file
    log.record("early", rows(1), scores(1), t0)
    log.record("retried", rows(1, 1), scores(1), t0 + 0.5)  # first answered before since
    log.record("edge", rows(1, 2), scores(1), t0 + 10)  # exactly at since: kept
    log.record("retried", rows(1, 1), scores(1), t0 + 11)  # the same id answered again
    log.record("late", rows(2, 3), scores(2), t0 + 3600)
    log.record_label("late", 1, "yes", t0 + 3700)
    log.stop()
    assert len(files(tmp_path)) >= 2

    since = datetime.fromtimestamp(t0 + 10, UTC)
    data = read_request_log(uri, since=since)
    assert list(zip(data.frame["id"], data.frame["row"], strict=True)) == [
        ("edge", 0), ("late", 0), ("late", 1),
    ]  # fmt: skip
    assert (data.frame["time"] >= since).all()
    assert data.labelled["id"].tolist() == ["late"]
    # The same moment written with another offset is the same instant.
    berlin = since.astimezone(timezone(timedelta(hours=1)))
    assert read_request_log(uri, since=berlin).frame["id"].tolist() == ["edge", "late", "late"]
    # One microsecond later leaves the row served at since out.
    later = read_request_log(uri, since=since + timedelta(microseconds=1))
    assert later.frame["id"].tolist() == ["late", "late"]
    assert read_request_log(uri).frame["id"].tolist() == [
        "early",
        "retried",
        "edge",
        "late",
        "late",
    ]
    assert read_request_log(uri, since=since + timedelta(days=1)).frame.empty
    with pytest.raises(ValueError, match="has no timezone"):
        read_request_log(uri, since=datetime(2023, 11, 14, 22, 13, 30))


def test_skipped_rows_count_only_the_window(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}"
    old = new_log(uri, version="v1", features=["f0", "f1"])
    old.record("old-early", rows(1)[:, :2], scores(1), 1_700_000_000.0)
    old.record("old-late", rows(2)[:, :2], scores(2), 1_700_000_100.0)
    old.stop()
    new = new_log(uri, version="v2")  # f0, f1, f2
    new.record("new", rows(1), scores(1), 1_700_000_200.0)
    new.stop()

    since = datetime.fromtimestamp(1_700_000_050.0, UTC)
    data = read_request_log(uri, since=since)  # v2's signature: v1's files lack f2
    assert data.frame["id"].tolist() == ["new"]
    assert data.skipped_rows == 2  # old-late's rows; old-early's is outside the window
    assert read_request_log(uri).skipped_rows == 3
