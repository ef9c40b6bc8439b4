"""``data.format: requestLog``: the ingest step reads a request log written by the real serving
recorder (a real Predictor with ``recording.attach``, labels fed back by request id) and turns
its labelled rows into the raw dataset: the served signature's features, the label as the
target, seeded splits. Nothing is trained (the served network is an untrained export)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.serving.artifact import save_model
from kubeloop.serving.predictor import Predictor, ServingOptions
from kubeloop.serving.recording import attach
from kubeloop.serving.samples import CLASSES, breast_cancer, mlp
from kubeloop_pipelines.contract import SCHEMA_FILE, SPLITS, StepError, StepResult
from kubeloop_pipelines.ml import builtin_datasets
from kubeloop_pipelines.progress import StepReport
from kubeloop_pipelines.steps import ingest


def request_log_spec(uri: str, **data: Any) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate(
        {
            "data": {"uri": uri, "format": "requestLog", "target": "diagnosis"} | data,
            "registration": {"modelName": "m"},
        }
    )


def run_ingest(spec: TrainingRunSpec, out: Path) -> StepResult:
    return ingest.run(spec, report=StepReport("", "ingest"), run_uri="", dataset_dir=out)


async def serve_and_label(
    model_dir: Path, uri: str, *, requests: int, labelled: int
) -> tuple[list[str], np.ndarray, list[str]]:
    """Serve ``requests`` breast-cancer rows (every 10th request carries 3 rows) through a real
    predictor logging to ``uri``; feed the true label back for the first ``labelled`` rows.
    Returns (features, the rows sent, their labels) in serving order."""
    x, y, names = breast_cancer()
    options = ServingOptions(request_log_uri=uri)
    predictor = Predictor.load(f"ingest-{uuid.uuid4().hex[:8]}", "v1", model_dir, options)
    attach(predictor, options)
    assert predictor.feedback is not None
    sent: list[tuple[str, int, int]] = []  # (request id, row, index into x)
    at = 0
    for r in range(requests):
        n = 3 if r % 10 == 9 else 1
        request_id = str(uuid.uuid4())
        await predictor.predict(x[at : at + n], request_id=request_id)
        sent += [(request_id, row, at + row) for row in range(n)]
        at += n
    now = time.time()
    for i, (request_id, row, index) in enumerate(sent[:labelled]):
        label: object = CLASSES[y[index]] if i % 2 else int(y[index])  # names and indexes
        status, body = predictor.feedback.submit(
            {"id": request_id, "row": row, "label": label}, now
        )
        assert status == 200, body
    predictor.feedback.submit({"id": "no-such-request", "label": 0}, now)  # counted, not logged
    await predictor.close()  # writes what the log still holds
    return names, x[:at], [CLASSES[v] for v in y[:at]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, _, names = breast_cancer()
    return save_model(
        tmp_path_factory.mktemp("served"), mlp(x.shape[1], 2), task="classification",
        features=names, classes=CLASSES, mean=x.mean(axis=0).tolist(),
        scale=x.std(axis=0).tolist(), reference={},
    )  # fmt: skip


async def test_labelled_rows_of_a_request_log_become_the_dataset(
    model_dir: Path, tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/log"
    names, x, labels = await serve_and_label(model_dir, uri, requests=220, labelled=180)
    assert len(x) == 220 + 22 * 2  # 22 requests of 3 rows

    result = run_ingest(request_log_spec(uri), tmp_path / "raw")

    schema = json.loads((tmp_path / "raw" / SCHEMA_FILE).read_text())
    assert schema["target"] == "diagnosis"
    assert schema["task"] == "classification"
    assert schema["modality"] == "tabular"
    assert [f["name"] for f in schema["features"]] == names  # the served signature's order
    assert {f["kind"] for f in schema["features"]} == {"numeric"}
    assert schema["classes"] == sorted(CLASSES)
    assert schema["source"] == uri
    assert schema["rows"]["total"] == 180
    parts = {s: pd.read_parquet(tmp_path / "raw" / f"{s}.parquet") for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == 180
    assert {s: len(p) for s, p in parts.items()} == {s: schema["rows"][s] for s in SPLITS}
    assert len(parts["test"]) == pytest.approx(180 * 0.15, abs=2)
    for part in parts.values():
        assert list(part.columns) == [*names, "diagnosis"]
    # Exactly the labelled rows, with the values served and the labels fed back.
    got = pd.concat(parts.values()).sort_values([*names, "diagnosis"], ignore_index=True)
    want = pd.DataFrame(x[:180], columns=names).assign(diagnosis=labels[:180])
    want = want.sort_values([*names, "diagnosis"], ignore_index=True)
    np.testing.assert_array_equal(got[names].to_numpy(), want[names].to_numpy())
    assert got["diagnosis"].tolist() == want["diagnosis"].tolist()
    assert result.metrics["rows"] == 180
    assert result.metrics["rows_without_target"] == len(x) - 180  # requests no label came for
    assert result.metrics["features"] == len(names)


async def test_chosen_features_keep_their_order(model_dir: Path, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/log"
    names, x, _ = await serve_and_label(model_dir, uri, requests=60, labelled=60)
    chosen = [names[4], names[0], names[2]]

    run_ingest(request_log_spec(uri, features=chosen), tmp_path / "raw")

    schema = json.loads((tmp_path / "raw" / SCHEMA_FILE).read_text())
    assert [f["name"] for f in schema["features"]] == chosen
    train = pd.read_parquet(tmp_path / "raw" / "train.parquet")
    assert list(train.columns) == [*chosen, "diagnosis"]
    served = {tuple(row) for row in x[:, [4, 0, 2]].tolist()}
    assert {tuple(row) for row in train[chosen].to_numpy().tolist()} <= served


async def test_a_log_without_labels_is_a_step_error_on_the_uri(
    model_dir: Path, tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/log"
    await serve_and_label(model_dir, uri, requests=10, labelled=0)
    with pytest.raises(StepError, match="none of the 12 logged rows") as info:
        run_ingest(request_log_spec(uri), tmp_path / "raw")
    assert info.value.field == "data.uri"


async def test_the_spec_must_fit_the_log(model_dir: Path, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/log"
    names, _, _ = await serve_and_label(model_dir, uri, requests=10, labelled=10)

    with pytest.raises(StepError, match="request log is of a classification model") as info:
        run_ingest(request_log_spec(uri, task="regression"), tmp_path / "a")
    assert info.value.field == "data.task"
    with pytest.raises(StepError, match="is a feature of the request log") as info:
        run_ingest(request_log_spec(uri, target=names[0]), tmp_path / "b")
    assert info.value.field == "data.target"
    with pytest.raises(StepError, match="no predictions file has the features") as info:
        run_ingest(request_log_spec(uri, features=["not_served"]), tmp_path / "c")
    assert info.value.field == "data.features"
    with pytest.raises(StepError, match="holds no request log") as info:
        run_ingest(request_log_spec(f"file://{tmp_path}/empty"), tmp_path / "d")
    assert info.value.field == "data.uri"


async def test_retraining_data_is_the_template_plus_the_rows_served_since(
    model_dir: Path, tmp_path: Path
) -> None:
    """What a DriftPolicy's retraining run reads: the original data, then the labelled rows
    served in the window (the label column becomes the template's target)."""
    uri = f"file://{tmp_path}/log"
    await serve_and_label(model_dir, uri, requests=30, labelled=30)  # before the window
    since = dt.datetime.now(dt.UTC)
    names, x, labels = await serve_and_label(model_dir, uri, requests=50, labelled=40)
    stamp = since.isoformat(timespec="microseconds").replace("+00:00", "Z")
    spec = TrainingRunSpec.model_validate(
        {
            "data": {
                "uri": "builtin://breast-cancer",
                "target": "label",
                "extra": [{"uri": uri, "format": "requestLog", "since": stamp}],
            },
            "registration": {"modelName": "m"},
        }
    )

    result = run_ingest(spec, tmp_path / "raw")

    schema = json.loads((tmp_path / "raw" / SCHEMA_FILE).read_text())
    assert schema["rows"]["total"] == 569 + 40
    assert [f["name"] for f in schema["features"]] == names
    assert schema["classes"] == sorted(CLASSES)
    assert schema["sources"][1] == {
        "field": "data.extra[0]", "uri": uri, "format": "requestLog", "since": stamp,
        "rows": len(x), "labelled": 40,
    }  # fmt: skip
    assert result.metrics["extra_rows"] == 40
    got = pd.concat(pd.read_parquet(tmp_path / "raw" / f"{s}.parquet") for s in SPLITS)
    # exactly the template's rows and the window's 40 labelled ones (the 36 rows served
    # before it are left out: without since the table would hold 569 + 76 rows)
    template = builtin_datasets.load_builtin("breast-cancer")
    window = pd.DataFrame(x[:40].astype("float64"), columns=names).assign(label=labels[:40])
    want = pd.concat([template, window], ignore_index=True)
    order = [*names, "label"]
    pd.testing.assert_frame_equal(
        got[order].sort_values(order, ignore_index=True),
        want[order].sort_values(order, ignore_index=True),
        check_dtype=False,
    )


async def test_since_on_the_main_log_reads_only_the_window(model_dir: Path, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/log"
    await serve_and_label(model_dir, uri, requests=30, labelled=30)
    since = dt.datetime.now(dt.UTC)
    await serve_and_label(model_dir, uri, requests=60, labelled=55)
    stamp = since.isoformat(timespec="microseconds").replace("+00:00", "Z")

    result = run_ingest(request_log_spec(uri, since=stamp), tmp_path / "raw")

    assert result.metrics["rows"] == 55
    assert result.metrics["rows_without_target"] == 60 + 6 * 2 - 55
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(StepError, match=f"served at or after data.since={later}") as info:
        run_ingest(request_log_spec(uri, since=later), tmp_path / "empty")
    assert info.value.field == "data.since"


async def test_a_log_without_a_column_of_the_main_table_names_it(
    model_dir: Path, tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/log"
    await serve_and_label(model_dir, uri, requests=10, labelled=10)
    template = builtin_datasets.load_builtin("breast-cancer").assign(age=50)
    template.to_csv(tmp_path / "template.csv", index=False)
    spec = TrainingRunSpec.model_validate(
        {
            "data": {
                "uri": f"file://{tmp_path}/template.csv",
                "target": "label",
                "extra": [{"uri": uri, "format": "requestLog"}],
            },
            "registration": {"modelName": "m"},
        }
    )
    with pytest.raises(StepError, match=r"lacks columns the main table has: \['age'\]") as info:
        run_ingest(spec, tmp_path / "raw")
    assert info.value.field == "data.extra[0].uri"
