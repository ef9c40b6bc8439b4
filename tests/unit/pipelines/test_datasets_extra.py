"""``data.extra``: rows of more sources appended to the main one before the split, checked
against its columns, and counted in the dataset's digest and ``schema.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop_pipelines.contract import SCHEMA_FILE, SPLITS, StepError, StepResult
from kubeloop_pipelines.ml import builtin_datasets, datasets
from kubeloop_pipelines.progress import StepReport
from kubeloop_pipelines.steps import ingest
from tests.unit.pipelines.conftest import data_source


def write_csv(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return f"file://{path}"


def main_table(tmp_path: Path, n: int = 6) -> str:
    frame = pd.DataFrame(
        {"a": range(n), "b": [0.5 * i for i in range(n)], "y": [i % 2 for i in range(n)]}
    )
    return write_csv(tmp_path / "main.csv", frame)


def test_extra_rows_follow_the_main_ones_in_the_main_column_order(tmp_path: Path) -> None:
    main = main_table(tmp_path)
    # other column order, an extra column (dropped), labels as floats (a csv with gaps)
    first = write_csv(
        tmp_path / "first.csv",
        pd.DataFrame({"y": [1.0, 0.0], "unused": ["u", "v"], "b": [10.5, 11.5], "a": [10, 11]}),
    )
    second = write_csv(tmp_path / "second.csv", pd.DataFrame({"a": [20], "b": [20.5], "y": [1]}))
    data = data_source(uri=main, extra=[{"uri": first}, {"uri": second}])

    table = datasets.load_table(data)

    assert list(table.frame.columns) == ["a", "b", "y"]
    assert table.frame["a"].tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 20]
    assert table.frame["b"].tolist()[-3:] == [10.5, 11.5, 20.5]
    # one class vocabulary: 1 in one csv and 1.0 in another are the same class
    assert table.frame["y"].tolist() == ["0", "1", "0", "1", "0", "1", "1", "0", "1"]
    assert datasets.sorted_classes(table.frame["y"]) == ["0", "1"]
    assert [(s.where, s.uri, s.rows) for s in table.sources] == [
        ("data", main, 6),
        ("data.extra[0]", first, 2),
        ("data.extra[1]", second, 1),
    ]
    assert table.columns_read == 3


def test_features_select_the_same_columns_of_every_source(tmp_path: Path) -> None:
    main = main_table(tmp_path)
    extra = write_csv(tmp_path / "extra.csv", pd.DataFrame({"y": [1], "b": [9.0]}))  # no a
    table = datasets.load_table(data_source(uri=main, features=["b"], extra=[{"uri": extra}]))
    assert list(table.frame.columns) == ["b", "y"]
    assert table.frame["b"].tolist()[-1] == 9.0


def test_a_source_without_a_column_of_the_main_table_names_it(tmp_path: Path) -> None:
    main = main_table(tmp_path)
    fine = write_csv(tmp_path / "fine.csv", pd.DataFrame({"a": [1], "b": [1.0], "y": [0]}))
    short = write_csv(tmp_path / "short.csv", pd.DataFrame({"b": [1.0], "label": [0]}))
    data = data_source(uri=main, extra=[{"uri": fine}, {"uri": short}])

    with pytest.raises(StepError) as info:
        datasets.load_table(data)

    assert info.value.field == "data.extra[1].uri"
    assert f"data.extra[1].uri={short} lacks columns" in info.value.message
    assert "a, y" in info.value.message  # the missing ones, in the main table's order
    assert info.value.permanent


def test_a_source_with_text_where_the_main_table_has_numbers_is_refused(tmp_path: Path) -> None:
    main = main_table(tmp_path)
    text = write_csv(tmp_path / "text.csv", pd.DataFrame({"a": ["x"], "b": [1.0], "y": [0]}))
    with pytest.raises(StepError, match=r"other kinds of values .* columns a \(") as info:
        datasets.load_table(data_source(uri=main, extra=[{"uri": text}]))
    assert info.value.field == "data.extra[0].uri"


def test_an_unreadable_extra_source_is_named_by_its_own_field(tmp_path: Path) -> None:
    main = main_table(tmp_path)
    missing = f"file://{tmp_path}/nope.csv"
    with pytest.raises(StepError, match=r"data.extra\[0\].uri=.*nope.csv does not exist") as info:
        datasets.load_table(data_source(uri=main, extra=[{"uri": missing}]))
    assert info.value.field == "data.extra[0].uri"
    with pytest.raises(StepError, match=r"data.extra\[0\].uri=builtin://nope names no") as info:
        datasets.load_table(data_source(uri=main, extra=[{"uri": "builtin://nope"}]))
    assert info.value.field == "data.extra[0].uri"
    with pytest.raises(StepError, match=r"set data.extra\[0\].format") as info:
        datasets.load_table(data_source(uri=main, extra=[{"uri": f"file://{tmp_path}/t.bin"}]))
    assert info.value.field == "data.extra[0].format"


def test_since_on_a_table_is_refused_even_without_the_api_server(tmp_path: Path) -> None:
    # The CRD's CEL rule refuses it at admission; a spec that skipped admission fails here.
    main = main_table(tmp_path)
    data = data_source(uri=main, extra=[{"uri": main}])
    data.extra[0].since = "2026-12-01T14:00:00Z"
    with pytest.raises(StepError, match=r"data.extra\[0\].format is 'auto'") as info:
        datasets.load_table(data)
    assert info.value.field == "data.extra[0].since"


def run_ingest(spec: TrainingRunSpec, out: Path) -> StepResult:
    return ingest.run(spec, report=StepReport("", "ingest"), run_uri="", dataset_dir=out)


def cancer_spec(**data: Any) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate(
        {
            "data": {"uri": "builtin://breast-cancer", "target": "label"} | data,
            "registration": {"modelName": "m"},
        }
    )


def test_ingest_splits_every_source_and_the_digest_covers_them(tmp_path: Path) -> None:
    cancer = builtin_datasets.load_builtin("breast-cancer")
    served = cancer.head(40).iloc[:, ::-1].copy()
    served.loc[served.index[:5], "label"] = None  # rows no label came for
    extra = write_csv(tmp_path / "served.csv", served)

    alone = run_ingest(cancer_spec(), tmp_path / "alone")
    both = run_ingest(cancer_spec(extra=[{"uri": extra}]), tmp_path / "both")

    schema = json.loads((tmp_path / "both" / SCHEMA_FILE).read_text())
    assert schema["rows"]["total"] == 569 + 35
    parts = {s: pd.read_parquet(tmp_path / "both" / f"{s}.parquet") for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == 569 + 35
    assert list(parts["train"].columns) == list(cancer.columns)
    assert schema["source"] == "builtin://breast-cancer"
    assert schema["sources"] == [
        {"field": "data", "uri": "builtin://breast-cancer", "format": "auto", "since": None,
         "rows": 569, "labelled": 569},
        {"field": "data.extra[0]", "uri": extra, "format": "auto", "since": None,
         "rows": 40, "labelled": 35},
    ]  # fmt: skip
    assert both.metrics["rows"] == 604
    assert both.metrics["extra_rows"] == 35
    assert both.metrics["rows_without_target"] == 5
    assert "extra_rows" not in alone.metrics
    # datasetSha256 (lineage) tells the two datasets apart; the main table alone is unchanged
    assert both.outputs["sha256"] != alone.outputs["sha256"]
    labelled = pd.concat([cancer, served.dropna(subset=["label"])[cancer.columns]])
    assert both.outputs["sha256"] == datasets.fingerprint(labelled.reset_index(drop=True))
    alone_schema = json.loads((tmp_path / "alone" / SCHEMA_FILE).read_text())
    assert alone.outputs["sha256"] == datasets.fingerprint(cancer)
    assert [s["field"] for s in alone_schema["sources"]] == ["data"]
    assert datasets.DatasetSchema.from_json(schema).sources == schema["sources"]
