"""Label feedback (serving/feedback.py) through a real Predictor: real artifacts (untrained
torch networks, exported and loaded), ``recording.attach`` and the prometheus_client default
registry the runtime exports. Every test serves its own model name, so counters start at 0."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kubeloop.serving.artifact import save_model
from kubeloop.serving.feedback import MAX_BATCH, FeedbackStore
from kubeloop.serving.predictor import Predictor, ServingOptions
from kubeloop.serving.recording import attach
from kubeloop.serving.request_log import RequestLog
from kubeloop.serving.request_log_reader import read_request_log
from kubeloop.serving.samples import CLASSES, breast_cancer, mlp

REGRESSION_FEATURES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real breast-cancer classification artifact (an untrained network: nothing to wait for)."""
    x, _, names = breast_cancer()
    return save_model(
        tmp_path_factory.mktemp("classifier"), mlp(x.shape[1], 2), task="classification",
        features=names, classes=CLASSES, mean=x.mean(axis=0).tolist(),
        scale=x.std(axis=0).tolist(), reference={},
    )  # fmt: skip


@pytest.fixture(scope="module")
def regressor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(
        tmp_path_factory.mktemp("regressor"), mlp(3, 1), task="regression",
        features=REGRESSION_FEATURES, mean=[0.0] * 3, scale=[1.0] * 3, reference={},
    )  # fmt: skip


def served(model_dir: Path, options: ServingOptions | None = None) -> Predictor:
    """A loaded predictor under a fresh model name, with the recorders attached."""
    options = options or ServingOptions()
    predictor = Predictor.load(f"fb-{uuid.uuid4().hex[:8]}", "v1", model_dir, options)
    attach(predictor, options)
    return predictor


def store_of(predictor: Predictor) -> FeedbackStore:
    assert isinstance(predictor.feedback, FeedbackStore)
    return predictor.feedback


def value(predictor: Predictor, name: str, **labels: str) -> float:
    got = REGISTRY.get_sample_value(
        name, {"model": predictor.name, "version": predictor.version} | labels
    )
    assert got is not None, (name, labels)
    return got


def outcome(predictor: Predictor, name: str) -> float:
    return value(predictor, "kubeloop_feedback_labels_total", outcome=name)


async def answer(predictor: Predictor, rows: np.ndarray) -> tuple[str, np.ndarray]:
    request_id = str(uuid.uuid4())
    return request_id, await predictor.predict(rows, request_id=request_id)


async def test_labels_join_by_id_into_confusion_cells_and_coverage(classifier_dir: Path) -> None:
    predictor = served(classifier_dir)
    x, y, _ = breast_cancer()
    sent: list[tuple[str, int, int]] = []  # (id, predicted, label)
    for i in range(40):
        request_id, out = await answer(predictor, x[i : i + 1])
        sent.append((request_id, int(out.argmax(axis=1)[0]), int(y[i])))
    now = time.time()
    for i, (request_id, _, label) in enumerate(sent[:30]):
        # class names and class indexes are both accepted
        status, body = predictor.feedback.submit(  # type: ignore[union-attr]
            {"id": request_id, "label": CLASSES[label] if i % 2 else label}, now
        )
        assert (status, body["status"], body["row"]) == (200, "matched", 0), body

    for a, actual in enumerate(CLASSES):
        for p, predicted in enumerate(CLASSES):
            want = sum(1 for _, pr, lab in sent[:30] if (lab, pr) == (a, p))
            got = value(
                predictor, "kubeloop_feedback_confusion_total", actual=actual,
                predicted=predicted, correct=str(a == p).lower(),
            )  # fmt: skip
            assert got == want, (actual, predicted)
    assert value(predictor, "kubeloop_feedback_predictions_total") == 40
    assert outcome(predictor, "matched") == 30
    assert value(predictor, "kubeloop_feedback_pending") == 10
    assert store_of(predictor).pending == 10
    await predictor.close()


async def test_the_same_label_twice_counts_once(classifier_dir: Path) -> None:
    predictor = served(classifier_dir)
    x, _, _ = breast_cancer()
    request_id, out = await answer(predictor, x[:1])
    predicted = CLASSES[int(out.argmax())]
    feedback = store_of(predictor)
    now = time.time()

    first = feedback.submit({"id": request_id, "label": "benign"}, now)
    again = feedback.submit({"id": request_id, "label": "benign"}, now + 1)
    by_index = feedback.submit({"id": request_id, "label": CLASSES.index("benign")}, now + 2)
    other = feedback.submit({"id": request_id, "label": "malignant"}, now + 3)

    assert (first[0], first[1]["status"]) == (200, "matched")
    assert (again[0], again[1]["status"]) == (200, "duplicate")
    assert (by_index[0], by_index[1]["status"]) == (200, "duplicate")
    assert (other[0], other[1]["status"], other[1]["field"]) == (409, "conflict", "label")
    assert "already labelled 'benign'" in str(other[1]["error"])
    cells = {
        (a, p): value(
            predictor,
            "kubeloop_feedback_confusion_total",
            actual=a,
            predicted=p,
            correct=str(a == p).lower(),
        )
        for a in CLASSES
        for p in CLASSES
    }
    assert cells == {(a, p): float(a == "benign" and p == predicted) for a, p in cells}
    assert (outcome(predictor, "matched"), outcome(predictor, "duplicate")) == (1, 2)
    assert outcome(predictor, "conflict") == 1
    assert value(predictor, "kubeloop_feedback_label_delay_seconds_count") == 1


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"id": "ID", "label": "benignish"}, "label"),  # not a class name
        ({"id": "ID", "label": 2}, "label"),  # index out of range
        ({"id": "ID", "label": -1}, "label"),
        ({"id": "ID", "label": True}, "label"),  # a bool is not an index
        ({"id": "ID", "label": 0.0}, "label"),  # nor is a float
        ({"id": "ID", "label": None}, "label"),
        ({"id": "ID", "label": ["benign"]}, "label"),
        ({"id": "ID"}, "label"),  # missing
        ({"id": 7, "label": "benign"}, "id"),
        ({"id": "", "label": "benign"}, "id"),
        ({"id": "x" * 300, "label": "benign"}, "id"),
        ({"label": "benign"}, "id"),
        ({"id": "ID", "row": "0", "label": "benign"}, "row"),
        ({"id": "ID", "row": -1, "label": "benign"}, "row"),
        ({"id": "ID", "row": 1, "label": "benign"}, "row"),  # the request had one row
        ("benign", "body"),
        (None, "body"),
    ],
)
async def test_a_malformed_label_is_400_naming_the_field(
    classifier_dir: Path, item: object, field: str
) -> None:
    predictor = served(classifier_dir)
    x, _, _ = breast_cancer()
    request_id, _ = await answer(predictor, x[:1])
    if isinstance(item, dict) and item.get("id") == "ID":
        item = item | {"id": request_id}

    status, body = store_of(predictor).submit(item, time.time())

    assert (status, body["status"], body["field"]) == (400, "invalid", field), body
    assert str(body["error"]).startswith(field) or field == "body", body
    assert outcome(predictor, "invalid") == 1
    assert outcome(predictor, "matched") == 0
    assert store_of(predictor).pending == 1  # the prediction still waits for a good label


@pytest.mark.parametrize("label", ["3.5", float("nan"), float("inf"), True, None, [1.0]])
async def test_a_regression_label_must_be_a_finite_number(
    regressor_dir: Path, label: object
) -> None:
    predictor = served(regressor_dir)
    request_id, _ = await answer(predictor, np.zeros((1, 3), dtype=np.float32))

    status, body = store_of(predictor).submit({"id": request_id, "label": label}, time.time())

    assert (status, body["field"]) == (400, "label"), body
    assert "expected a finite number" in str(body["error"])


async def test_an_unknown_id_is_404_and_counted(classifier_dir: Path) -> None:
    predictor = served(classifier_dir)

    status, body = store_of(predictor).submit({"id": "never-served", "label": 0}, time.time())

    assert (status, body["status"], body["field"]) == (404, "unknown", "id")
    assert "'never-served'" in str(body["error"])
    assert outcome(predictor, "unknown") == 1


async def test_ttl_expiry_is_counted_and_a_late_label_is_410(classifier_dir: Path) -> None:
    predictor = served(classifier_dir, ServingOptions(feedback_ttl_s=60))
    x, _, _ = breast_cancer()
    late_id, _ = await answer(predictor, x[:1])
    expired_id, _ = await answer(predictor, x[1:2])
    feedback = store_of(predictor)
    now = time.time()

    status, body = feedback.submit({"id": late_id, "label": 0}, now + 61)
    assert (status, body["status"], body["field"]) == (410, "late", "id")
    assert "60 s" in str(body["error"])
    feedback.expire(now + 61)  # the other one expires without any label

    assert value(predictor, "kubeloop_feedback_evictions_total", reason="expired") == 2
    assert value(predictor, "kubeloop_feedback_evictions_total", reason="capacity") == 0
    assert feedback.pending == 0
    assert (outcome(predictor, "late"), outcome(predictor, "matched")) == (1, 0)
    assert feedback.submit({"id": expired_id, "label": 0}, now + 62)[0] == 410


async def test_expiry_is_counted_at_scrape_time_without_traffic(classifier_dir: Path) -> None:
    predictor = served(classifier_dir, ServingOptions(feedback_ttl_s=0.05))
    x, _, _ = breast_cancer()
    await answer(predictor, x[:3])
    assert store_of(predictor).pending == 3
    await asyncio.sleep(0.1)

    assert value(predictor, "kubeloop_feedback_pending") == 0  # reading it expires
    assert value(predictor, "kubeloop_feedback_evictions_total", reason="expired") == 3


def test_capacity_evicts_the_oldest_and_labels_for_them_are_late() -> None:
    model = f"fb-{uuid.uuid4().hex[:8]}"
    feedback = FeedbackStore(model, "v1", task="regression", ttl_s=3600, max_entries=3)
    now = time.time()  # scraping expires by the wall clock: record at real times
    for i in range(5):
        feedback.record(f"r{i}", np.zeros((1, 3), np.float32), np.full(1, i, np.float32), now)

    assert feedback.submit({"id": "r0", "label": 1.0}, now + 1)[0] == 410
    assert feedback.submit({"id": "r4", "label": 1.0}, now + 1)[0] == 200
    evicted = REGISTRY.get_sample_value(
        "kubeloop_feedback_evictions_total", {"model": model, "version": "v1", "reason": "capacity"}
    )
    assert evicted == 2
    assert feedback.pending == 2  # r2, r3


def test_rows_held_are_bounded_too() -> None:
    feedback = FeedbackStore("fb-rows", "v1", task="regression", max_rows=10)
    now = time.time()
    for i in range(4):  # 4 requests of 4 rows: only 2 fit in 10 rows
        feedback.record(f"q{i}", np.zeros((4, 3), np.float32), np.zeros(4, np.float32), now)
    assert feedback.pending == 8
    assert feedback.submit({"id": "q1", "row": 0, "label": 0.0}, now)[0] == 410
    assert feedback.submit({"id": "q3", "row": 3, "label": 0.0}, now)[0] == 200


async def test_each_row_of_a_request_is_labelled_on_its_own(regressor_dir: Path) -> None:
    predictor = served(regressor_dir)
    request_id, out = await answer(predictor, np.arange(9, dtype=np.float32).reshape(3, 3))
    feedback = store_of(predictor)
    now = time.time()

    missing_row = feedback.submit({"id": request_id, "label": 1.0}, now)
    assert (missing_row[0], missing_row[1]["field"]) == (400, "row")
    assert "answered 3 rows" in str(missing_row[1]["error"])
    status, body = feedback.submit(
        [{"id": request_id, "row": r, "label": float(out[r]) + r} for r in range(3)], now
    )

    assert status == 200
    assert [r["status"] for r in body["results"]] == ["matched"] * 3  # type: ignore[attr-defined]
    assert value(predictor, "kubeloop_feedback_absolute_error_count") == 3
    assert value(predictor, "kubeloop_feedback_absolute_error_sum") == pytest.approx(0 + 1 + 2)
    assert value(predictor, "kubeloop_feedback_squared_error_total") == pytest.approx(0 + 1 + 4)
    assert feedback.pending == 0


async def test_regression_errors_land_in_their_buckets(regressor_dir: Path) -> None:
    predictor = served(regressor_dir)
    rng = np.random.default_rng(0)
    errors = [0.0005, 0.003, -0.2, 4.0, -70.0, 9000.0]
    for err in errors:
        request_id, out = await answer(predictor, rng.normal(size=(1, 3)).astype(np.float32))
        label = float(out[0]) - err  # prediction - label = err
        assert store_of(predictor).submit({"id": request_id, "label": label}, time.time())[0] == 200

    def le(bound: str) -> float:
        return value(predictor, "kubeloop_feedback_absolute_error_bucket", le=bound)

    assert [le("0.001"), le("0.005"), le("0.25"), le("5.0"), le("100.0"), le("10000.0")] == [
        1, 2, 3, 4, 5, 6,
    ]  # fmt: skip
    assert le("0.0025") == 1
    mae = value(predictor, "kubeloop_feedback_absolute_error_sum") / len(errors)
    assert mae == pytest.approx(np.mean(np.abs(errors)), rel=1e-6)
    assert value(predictor, "kubeloop_feedback_squared_error_total") == pytest.approx(
        float(np.sum(np.square(errors))), rel=1e-6
    )


def test_label_delay_is_the_time_from_prediction_to_label() -> None:
    model = f"fb-{uuid.uuid4().hex[:8]}"
    feedback = FeedbackStore(model, "v1", task="classification", classes=CLASSES, ttl_s=7200)
    outputs = np.array([[0.9, 0.1]], np.float32)
    now = time.time()
    for i, delay in enumerate([3.0, 40.0, 700.0, 5000.0]):
        feedback.record(f"d{i}", np.zeros((1, 30), np.float32), outputs, now)
        assert feedback.submit({"id": f"d{i}", "label": 0}, now + delay)[0] == 200

    def sample(suffix: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(
            f"kubeloop_feedback_label_delay_seconds_{suffix}",
            {"model": model, "version": "v1"} | labels,
        )

    assert sample("sum") == pytest.approx(3 + 40 + 700 + 5000)
    assert sample("count") == 4
    assert [sample("bucket", le=b) for b in ("5.0", "60.0", "1800.0", "7200.0")] == [1, 2, 3, 4]


def test_options_that_can_never_work_are_refused() -> None:
    with pytest.raises(ValueError, match="feedback_ttl_s=0"):
        FeedbackStore("m", "v", task="regression", ttl_s=0)
    with pytest.raises(ValueError, match="classification needs at least 2"):
        FeedbackStore("m", "v", task="classification", classes=["only"])


async def test_a_batch_answers_each_item_and_counts_them(classifier_dir: Path) -> None:
    predictor = served(classifier_dir)
    x, _, _ = breast_cancer()
    request_id, _ = await answer(predictor, x[:1])
    feedback = store_of(predictor)

    status, body = feedback.submit(
        [
            {"id": request_id, "label": "benign"},
            {"id": request_id, "label": "benign"},
            {"id": "nobody", "label": "benign"},
            {"id": request_id, "label": 5},
            "not an object",
        ],
        time.time(),
    )

    assert status == 200
    results = body["results"]
    assert isinstance(results, list)
    assert [r["status"] for r in results] == [
        "matched", "duplicate", "unknown", "invalid", "invalid",
    ]  # fmt: skip
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert results[3]["field"] == "label"
    assert body["counts"] == {
        "matched": 1, "duplicate": 1, "conflict": 0, "late": 0, "unknown": 1, "invalid": 2,
    }  # fmt: skip
    for size in (0, MAX_BATCH + 1):
        too = feedback.submit([{"id": request_id, "label": 0}] * size, time.time())
        assert (too[0], too[1]["field"]) == (400, "body")
        assert f"has {size} items" in str(too[1]["error"])


async def test_attach_joins_matched_labels_into_the_request_log(
    classifier_dir: Path, tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/log"
    predictor = served(classifier_dir, ServingOptions(request_log_uri=uri))
    assert [type(r) for r in predictor.recorders] == [FeedbackStore, RequestLog]
    assert store_of(predictor) is predictor.recorders[0]
    x, _, _ = breast_cancer()
    ids = [(await answer(predictor, x[i : i + 1]))[0] for i in range(5)]
    now = time.time()
    store_of(predictor).submit([{"id": i, "label": "benign"} for i in ids[:3]], now)
    store_of(predictor).submit({"id": ids[0], "label": "benign"}, now)  # a duplicate: not logged
    store_of(predictor).submit({"id": "stranger", "label": "benign"}, now)

    await predictor.close()  # flushes the log

    log = read_request_log(uri)
    assert list(log.frame["id"]) == ids
    assert list(log.frame["label"].iloc[:3]) == ["benign"] * 3
    assert log.frame["label"].iloc[3:].isna().all()
    np.testing.assert_array_equal(log.frame[log.features].to_numpy(), x[:5])


def test_attach_without_a_request_log_uri_keeps_feedback_only(classifier_dir: Path) -> None:
    predictor = served(classifier_dir)
    assert [type(r) for r in predictor.recorders] == [FeedbackStore]
    assert store_of(predictor) is predictor.recorders[0]


def test_record_takes_microseconds() -> None:
    feedback = FeedbackStore("fb-speed", "v1", task="classification", classes=CLASSES)
    rows, outputs = np.zeros((1, 30), np.float32), np.array([[0.3, 0.7]], np.float32)
    took, now = [], time.time()
    for i in range(2000):
        start = time.perf_counter()
        feedback.record(f"s{i}", rows, outputs, now)
        took.append(time.perf_counter() - start)
    assert float(np.median(took)) < 100e-6, np.median(took)
