"""Built-in datasets (ml/builtin_datasets.py), reading tables, schema inference and splitting
(ml/datasets.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubeloop.api.training_run import Split
from kubeloop_pipelines.contract import SPLITS, StepError
from kubeloop_pipelines.ml import builtin_datasets, datasets
from tests.unit.pipelines.conftest import data_source


@pytest.mark.parametrize(
    ("name", "rows", "columns"),
    [
        ("breast-cancer", 569, 31),
        ("digits", 1797, 65),
        ("diabetes", 442, 11),
        ("fraud", 20_000, 15),
        ("reviews", 600, 2),
    ],
)
def test_builtin_dataset_loads_offline_with_its_target(name: str, rows: int, columns: int) -> None:
    frame = builtin_datasets.load_builtin(name)

    assert frame.shape == (rows, columns)
    assert builtin_datasets.BUILTIN_TARGETS[name] in frame.columns
    assert frame[builtin_datasets.BUILTIN_TARGETS[name]].notna().all()


def test_builtin_datasets_have_the_documented_content() -> None:
    cancer = builtin_datasets.load_builtin("breast-cancer")
    assert set(cancer["label"]) == {"malignant", "benign"}
    assert "mean_radius" in cancer.columns  # names made snake_case for serving

    digits = builtin_datasets.load_builtin("digits")
    assert list(digits.columns[:64]) == [f"px_{i}" for i in range(64)]
    assert set(digits["digit"]) == set(range(10))
    assert digits.iloc[:, :64].to_numpy().max() == 16

    diabetes = builtin_datasets.load_builtin("diabetes")
    assert pd.api.types.is_float_dtype(diabetes["progression"])

    reviews = builtin_datasets.load_builtin("reviews")
    assert set(reviews["sentiment"]) == {"positive", "negative"}
    assert reviews["text"].str.split().str.len().mean() > 5


def test_fraud_is_rare_seeded_and_messy() -> None:
    frame = builtin_datasets.load_builtin("fraud")

    assert frame["is_fraud"].mean() == pytest.approx(0.01, abs=0.001)
    assert {"channel", "merchant_category", "amount", "hour"} <= set(frame.columns)
    assert frame.drop(columns="is_fraud").isna().any().sum() >= 2  # some missing values
    assert builtin_datasets.load_builtin("fraud", seed=0).equals(frame)
    assert not builtin_datasets.load_builtin("fraud", seed=1).equals(frame)


def test_fraud_overlaps_the_majority() -> None:
    """No single feature separates frauds: each one's fraud median lies inside the
    legitimate rows' interquartile range."""
    frame = builtin_datasets.load_builtin("fraud")
    fraud = frame[frame["is_fraud"] == 1]
    legit = frame[frame["is_fraud"] == 0]
    for column in frame.select_dtypes("number").columns.drop("is_fraud"):
        q1, q3 = legit[column].quantile([0.05, 0.95])
        assert q1 <= fraud[column].median() <= q3, column


def test_unknown_builtin_names_the_choices() -> None:
    with pytest.raises(StepError) as caught:
        builtin_datasets.load_builtin("iris")

    assert caught.value.field == "data.uri"
    assert "builtin://iris" in caught.value.message
    assert "builtin://digits" in caught.value.message


@pytest.mark.parametrize(
    ("suffix", "fmt"), [(".csv", "auto"), (".parquet", "auto"), (".dat", "csv")]
)
def test_read_table_round_trips_file_uris(tmp_path: Path, suffix: str, fmt: str) -> None:
    frame = pd.DataFrame({"a": [1.5, np.nan, 3.0], "b": ["x", "y", None], "y": [0, 1, 0]})
    path = tmp_path / f"table{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)

    read = datasets.read_table(f"file://{path}", fmt)

    def normalised(table: pd.DataFrame) -> pd.DataFrame:
        return table.astype(object).where(table.notna(), None)  # csv reads None back as NaN

    pd.testing.assert_frame_equal(normalised(read), normalised(frame), check_dtype=False)


def test_read_table_errors_name_the_uri_and_the_reason(tmp_path: Path) -> None:
    missing = f"file://{tmp_path}/nope.csv"
    with pytest.raises(StepError) as caught:
        datasets.read_table(missing, "auto")
    assert caught.value.field == "data.uri"
    assert missing in caught.value.message
    assert "does not exist" in caught.value.message

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(StepError, match="empty") as caught:
        datasets.read_table(f"file://{empty}", "auto")
    assert caught.value.field == "data.uri"

    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b,y\n")
    with pytest.raises(StepError, match="0 rows") as caught:
        datasets.read_table(f"file://{header_only}", "csv")
    assert caught.value.field == "data.uri"

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(StepError, match="cannot be read as parquet") as caught:
        datasets.read_table(f"file://{garbage}", "auto")
    assert caught.value.field == "data.uri"


def test_read_table_needs_a_format_it_can_infer(tmp_path: Path) -> None:
    with pytest.raises(StepError, match=r"set data\.format") as caught:
        datasets.read_table(f"file://{tmp_path}/table.bin", "auto")

    assert caught.value.field == "data.format"


def test_missing_target_lists_the_columns() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": [3, 4]})

    with pytest.raises(StepError) as caught:
        datasets.select_columns(frame, data_source(target="label"))

    assert caught.value.field == "data.target"
    assert "'label'" in caught.value.message
    assert "a, b" in caught.value.message


def test_unknown_feature_is_named() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": [3, 4], "y": [0, 1]})

    with pytest.raises(StepError) as caught:
        datasets.select_columns(frame, data_source(features=["a", "colour"]))

    assert caught.value.field == "data.features"
    assert "colour" in caught.value.message
    assert "a, b, y" in caught.value.message


def test_select_columns_keeps_the_requested_order_and_the_target_last() -> None:
    frame = pd.DataFrame({"a": [1], "b": [2], "y": [0], "c": [3]})

    assert list(datasets.select_columns(frame, data_source()).columns) == ["a", "b", "c", "y"]
    assert list(datasets.select_columns(frame, data_source(features=["c", "a"])).columns) == [
        "c",
        "a",
        "y",
    ]


def test_regression_needs_a_numeric_target() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": ["low", "high", "low"]})

    with pytest.raises(StepError) as caught:
        datasets.infer_schema(frame, data_source(task="regression"))

    assert caught.value.field == "data.task"
    assert "classification" in caught.value.message


def test_classification_needs_two_classes() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": ["yes", "yes", "yes"]})

    with pytest.raises(StepError) as caught:
        datasets.infer_schema(frame, data_source())

    assert caught.value.field == "data.target"
    assert "at least 2" in caught.value.message


def test_infer_schema_kinds_modality_and_classes() -> None:
    frame = pd.DataFrame(
        {
            "amount": [1.0, 2.5, np.nan, 4.0],
            "count": [1, 2, 3, 4],
            "channel": ["web", "app", "web", None],
            "y": [1.0, 0.0, 1.0, 0.0],  # integer labels as a csv with gaps gives them
        }
    )

    schema = datasets.infer_schema(frame, data_source())

    assert [(f.name, f.kind) for f in schema.features] == [
        ("amount", "numeric"),
        ("count", "numeric"),
        ("channel", "categorical"),
    ]
    assert schema.modality == "tabular"
    assert schema.classes == ["0", "1"]
    assert datasets.DatasetSchema.from_json(schema.to_json()) == schema


def test_text_and_image_modalities_are_recognised() -> None:
    reviews = builtin_datasets.load_builtin("reviews")
    text = datasets.infer_schema(reviews, data_source(uri="builtin://reviews", target="sentiment"))
    assert text.modality == "text"
    assert [(f.name, f.kind) for f in text.features] == [("text", "text")]

    digits = builtin_datasets.load_builtin("digits")
    image = datasets.infer_schema(digits, data_source(uri="builtin://digits", target="digit"))
    assert image.modality == "image"
    assert image.image_shape == [1, 8, 8]
    assert image.classes == [str(d) for d in range(10)]

    pixels = pd.DataFrame(np.zeros((3, 12)), columns=[f"p{i}" for i in range(12)])
    pixels["y"] = [0, 1, 0]
    assert datasets.infer_schema(pixels, data_source(format="images")).image_shape == [3, 2, 2]
    with pytest.raises(StepError) as caught:
        datasets.infer_schema(pixels.drop(columns="p0"), data_source(format="images"))
    assert caught.value.field == "data.features"


def test_stratified_split_keeps_class_ratios_and_is_seeded() -> None:
    frame = pd.DataFrame({"a": np.arange(1000.0), "y": ["rare"] * 50 + ["common"] * 950})
    settings = Split(validation=0.2, test=0.2, seed=7)

    parts = datasets.split(frame, settings, target="y", task="classification")

    assert [len(parts[name]) for name in SPLITS] == [600, 200, 200]
    for name in SPLITS:
        assert (parts[name]["y"] == "rare").mean() == pytest.approx(0.05)
    assert sorted(pd.concat(parts.values())["a"]) == list(frame["a"])  # a partition
    again = datasets.split(frame, settings, target="y", task="classification")
    assert all(parts[name].equals(again[name]) for name in SPLITS)
    other = datasets.split(frame, Split(validation=0.2, test=0.2, seed=8), target="y", task="")
    assert not parts["test"].equals(other["test"])


def test_stratified_split_puts_a_tiny_class_in_every_split() -> None:
    frame = pd.DataFrame({"a": np.arange(103.0), "y": ["tiny"] * 3 + ["big"] * 100})

    parts = datasets.split(frame, Split(), target="y", task="classification")

    assert all((parts[name]["y"] == "tiny").sum() == 1 for name in SPLITS)


def test_regression_split_uses_the_fractions() -> None:
    frame = pd.DataFrame({"a": np.arange(200.0), "y": np.linspace(0, 1, 200)})

    parts = datasets.split(frame, Split(validation=0.1, test=0.25), target="y", task="regression")

    assert [len(parts[name]) for name in SPLITS] == [130, 20, 50]


def test_fingerprint_changes_with_the_data() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]})
    changed = frame.assign(a=[1.0, 2.5])

    assert datasets.fingerprint(frame) == datasets.fingerprint(frame.copy())
    assert datasets.fingerprint(frame) != datasets.fingerprint(changed)
    assert len(datasets.fingerprint(frame)) == 64
