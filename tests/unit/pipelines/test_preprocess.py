"""Preprocessing (ml/preprocess.py), augmentation (ml/augment.py) and the ingest and preprocess
steps end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from kubeloop.api.training_run import Augmentation, Preprocessing
from kubeloop_pipelines.contract import (
    QUALITY_FILE,
    SCHEMA_FILE,
    SPLITS,
    TRANSFORM_FILE,
    StepError,
    write_json,
)
from kubeloop_pipelines.ml import datasets
from kubeloop_pipelines.ml.augment import augment_batch
from kubeloop_pipelines.ml.preprocess import Prepared, load_prepared, prepare
from kubeloop_pipelines.ml.text import PAD_ID, UNK_ID, encode_texts
from kubeloop_pipelines.ml.transforms import transform_module
from kubeloop_pipelines.progress import StepReport
from kubeloop_pipelines.steps import preprocess as preprocess_step
from tests.unit.pipelines.conftest import data_source, ingest_and_preprocess, make_spec

# --------------------------------------------------------------------------------------------
# helpers


def write_raw(
    root: Path,
    train: pd.DataFrame,
    validation: pd.DataFrame | None = None,
    test: pd.DataFrame | None = None,
    **data: Any,
) -> Path:
    """A raw-dataset directory as ingest writes it, from hand-made splits (target ``y``)."""
    frames = {
        "train": train,
        "validation": train.iloc[:2] if validation is None else validation,
        "test": train.iloc[:2] if test is None else test,
    }
    schema = datasets.infer_schema(
        pd.concat(frames.values(), ignore_index=True), data_source(**data)
    )
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_parquet(raw / f"{name}.parquet", index=False)
    write_json(raw / SCHEMA_FILE, schema.to_json())
    return raw


def prepare_frames(
    tmp_path: Path,
    train: pd.DataFrame,
    validation: pd.DataFrame | None = None,
    test: pd.DataFrame | None = None,
    *,
    data: dict[str, Any] | None = None,
    **preprocessing: Any,
) -> tuple[Prepared, dict[str, Any]]:
    raw = write_raw(tmp_path, train, validation, test, **(data or {}))
    settings = Preprocessing.model_validate({"scaling": "none"} | preprocessing)
    quality = prepare(raw, tmp_path / "prepared", settings)
    return load_prepared(tmp_path / "prepared"), quality


MIXED = pd.DataFrame(
    {
        "a": [1.0, 2.0, np.nan, 4.0, 10.0, 2.0],
        "c": ["x", "y", "x", None, "x", "z"],
        "y": [0, 1, 0, 1, 0, 1],
    }
)
MIXED_TEST = pd.DataFrame({"a": [np.nan, 3.0], "c": ["w", "y"], "y": [1, 0]})


# --------------------------------------------------------------------------------------------
# missing values, outliers, duplicates, encoding, scaling


@pytest.mark.parametrize(
    ("strategy", "fill"), [("mean", 3.8), ("median", 2.0), ("most_frequent", 2.0)]
)
def test_missing_numeric_values_get_the_train_statistic(
    tmp_path: Path, strategy: str, fill: float
) -> None:
    prepared, _ = prepare_frames(
        tmp_path, MIXED, test=MIXED_TEST, missing={"strategy": strategy}, encoding="ordinal"
    )

    assert prepared.input_features == ["a", "c"]
    assert prepared.x_train[2, 0] == pytest.approx(fill)
    assert prepared.x_test[0, 0] == pytest.approx(fill)  # fitted on train, applied to test
    assert prepared.transform["impute"]["values"][0] == pytest.approx(fill)


def test_missing_and_unknown_categories_get_the_most_frequent(tmp_path: Path) -> None:
    prepared, _ = prepare_frames(tmp_path, MIXED, test=MIXED_TEST, encoding="ordinal")

    assert prepared.transform["categories"] == {"c": ["x", "y", "z"]}
    assert prepared.x_train[3, 1] == 0  # None → "x", code 0
    assert prepared.x_test[0, 1] == 0  # unseen "w" → "x"
    assert prepared.x_test[1, 1] == 1
    assert math.isnan(prepared.serving_rows("test")[0, 1])  # clients send it as missing


def test_drop_strategy_removes_incomplete_rows_everywhere(tmp_path: Path) -> None:
    prepared, quality = prepare_frames(
        tmp_path, MIXED, test=MIXED_TEST, missing={"strategy": "drop"}
    )

    assert len(prepared.x_train) == 4
    assert len(prepared.x_test) == 1
    assert quality["missing_rows_dropped"] == 3  # 2 train + 1 test (validation is complete)
    assert quality["missing_fraction"]["after"] == 0


def test_model_imputation_matches_iterative_imputer(tmp_path: Path) -> None:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 1))
    values = np.hstack(
        [base, 2 * base + 0.1 * rng.normal(size=(200, 1)), rng.normal(size=(200, 1))]
    )
    holes = values.copy()
    holes[rng.random(values.shape) < 0.15] = np.nan
    frame = pd.DataFrame(holes, columns=["p", "q", "r"]).assign(y=rng.integers(0, 2, 200))
    train, test = frame.iloc[:150], frame.iloc[150:]

    prepared, _ = prepare_frames(
        tmp_path, train, test=test, missing={"strategy": "model"}, dropDuplicates=False
    )

    reference = IterativeImputer(max_iter=10, random_state=0).fit(train[["p", "q", "r"]])
    expected = reference.transform(test[["p", "q", "r"]])
    np.testing.assert_allclose(prepared.x_test, expected, rtol=1e-4, atol=1e-4)
    # a model beats the median on the correlated column
    missing_q = np.isnan(test["q"].to_numpy())
    error = np.abs(prepared.x_test[missing_q, 1] - values[150:][missing_q, 1]).mean()
    assert error < 0.5 * np.abs(np.nanmedian(train["q"]) - values[150:][missing_q, 1]).mean()


OUTLIERS = pd.DataFrame(
    {"v": [1.0, 2, 3, 4, 5, 6, 7, 8, 9, 100], "y": [0, 1] * 5},
)


def test_iqr_clip_clamps_every_split_to_the_train_bounds(tmp_path: Path) -> None:
    test = pd.DataFrame({"v": [-50.0, 5.0, 70.0], "y": [0, 1, 0]})
    prepared, quality = prepare_frames(
        tmp_path, OUTLIERS, test=test, outliers={"method": "iqr", "threshold": 1.5}
    )

    # q1=3.25, q3=7.75: bounds 3.25 - 6.75 and 7.75 + 6.75
    assert prepared.x_train[:, 0].max() == pytest.approx(14.5)
    np.testing.assert_allclose(prepared.x_test[:, 0], [-3.5, 5.0, 14.5])
    assert quality["outliers"]["found"] == 1
    assert quality["columns"][0]["outliers"] == 1


def test_zscore_drop_removes_train_rows_only(tmp_path: Path) -> None:
    test = pd.DataFrame({"v": [100.0, 5.0], "y": [0, 1]})
    prepared, quality = prepare_frames(
        tmp_path,
        OUTLIERS,
        test=test,
        outliers={"method": "zscore", "threshold": 2, "action": "drop"},
    )

    assert len(prepared.x_train) == 9
    assert prepared.x_train.max() == 9
    np.testing.assert_array_equal(prepared.x_test[:, 0], [100.0, 5.0])  # kept, not clipped
    assert quality["outliers"]["rows_dropped"] == 1


def test_duplicates_are_removed_only_when_asked(tmp_path: Path) -> None:
    frame = pd.concat([MIXED, MIXED.iloc[[0, 1]]], ignore_index=True)

    removed, quality = prepare_frames(tmp_path / "a", frame)
    kept, _ = prepare_frames(tmp_path / "b", frame, dropDuplicates=False)

    assert len(removed.x_train) == 6
    assert quality["duplicates"] == {"found": 2, "fraction": 2 / 12, "removed": 2}
    assert len(kept.x_train) == 8


def test_onehot_encoding_has_a_column_per_category(tmp_path: Path) -> None:
    prepared, _ = prepare_frames(tmp_path, MIXED, test=MIXED_TEST, encoding="onehot")

    assert prepared.input_features == ["a", "c=x", "c=y", "c=z"]
    np.testing.assert_array_equal(prepared.x_train[:, 1:], np.eye(3)[[0, 1, 0, 0, 0, 2]])
    np.testing.assert_array_equal(prepared.x_test[:, 1:], np.eye(3)[[0, 1]])


@pytest.mark.parametrize("scaling", ["standard", "minmax", "none"])
def test_scaling_is_fitted_on_train(tmp_path: Path, scaling: str) -> None:
    prepared, _ = prepare_frames(tmp_path, MIXED, scaling=scaling, encoding="onehot")
    numeric = prepared.x_train[:, 0]

    if scaling == "standard":
        assert numeric.mean() == pytest.approx(0, abs=1e-6)
        assert numeric.std() == pytest.approx(1, abs=1e-5)
    elif scaling == "minmax":
        assert (numeric.min(), numeric.max()) == (pytest.approx(0), pytest.approx(1))
    else:
        assert numeric.max() == 10
    assert set(np.unique(prepared.x_train[:, 1:])) == {0.0, 1.0}  # one-hot never scaled


# --------------------------------------------------------------------------------------------
# text


def test_text_tokens_use_a_train_vocabulary(tmp_path: Path) -> None:
    train = pd.DataFrame(
        {"t": ["Good, good product!", "Bad product", "good"], "y": ["pos", "neg", "pos"]}
    )
    test = pd.DataFrame({"t": ["Terrible product", None], "y": ["neg", "pos"]})

    prepared, _ = prepare_frames(tmp_path, train, test=test, data={"format": "text"})

    text = prepared.transform["text"]
    assert text["vocab"] == ["<pad>", "<unk>", "good", "product", "bad"]
    assert text["seq_len"] == 8 == prepared.input_shape[0]
    assert prepared.vocab_size == 5
    assert prepared.x_train.dtype == np.int64
    np.testing.assert_array_equal(prepared.x_train[0], [2, 2, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(prepared.x_test[0, :3], [UNK_ID, 3, PAD_ID])
    np.testing.assert_array_equal(prepared.x_test[1], [PAD_ID] * 8)
    assert prepared.serving_features == [f"tok_{i}" for i in range(8)]


def test_encode_texts_truncates_and_pads() -> None:
    ids = encode_texts(["a b c d", "b"], ["<pad>", "<unk>", "a", "b"], 3)

    np.testing.assert_array_equal(ids, [[2, 3, UNK_ID], [3, PAD_ID, PAD_ID]])


# --------------------------------------------------------------------------------------------
# data-quality report and gate


def test_all_missing_feature_is_named(tmp_path: Path) -> None:
    frame = MIXED.assign(empty=np.nan)

    with pytest.raises(StepError) as caught:
        prepare_frames(tmp_path, frame)

    assert caught.value.field == "data.features"
    assert "'empty'" in caught.value.message


@pytest.mark.parametrize(
    ("gate", "field"),
    [
        ({"minRows": 100}, "preprocessing.qualityGate.minRows"),
        ({"maxMissingFraction": 0.05}, "preprocessing.qualityGate.maxMissingFraction"),
        ({"maxDuplicateFraction": 0.1}, "preprocessing.qualityGate.maxDuplicateFraction"),
    ],
)
def test_quality_gate_stops_the_step_after_reporting(
    tmp_path: Path, gate: dict[str, Any], field: str
) -> None:
    frame = pd.concat([MIXED, MIXED.iloc[[0, 1]]], ignore_index=True)
    raw = write_raw(tmp_path, frame)
    spec = make_spec(
        "file:///data/table.csv", "y", preprocessing={"qualityGate": {"minRows": 1} | gate}
    )
    html = tmp_path / "report.html"

    with pytest.raises(StepError) as caught:
        preprocess_step.run(
            spec,
            report=StepReport("", "preprocess"),
            run_uri="",
            raw_dir=raw,
            prepared_dir=tmp_path / "prepared",
            report_html=html,
        )

    assert caught.value.field == field
    assert html.is_file()
    quality = json.loads((tmp_path / "prepared" / QUALITY_FILE).read_text())
    assert quality["gate"]["passed"] is False


def test_quality_report_counts_and_renders(tmp_path: Path) -> None:
    from kubeloop_pipelines.ml.quality import render_quality_html

    _, quality = prepare_frames(tmp_path, MIXED, test=MIXED_TEST)

    assert quality["rows"]["before"] == {"train": 6, "validation": 2, "test": 2, "total": 10}
    columns = {c["name"]: c for c in quality["columns"]}
    assert columns["a"]["missing_before"] == pytest.approx(0.2)  # 2 of 10 rows
    assert columns["a"]["missing_after"] == 0
    assert quality["class_balance"]["after"]["train"] == {"0": 3, "1": 3}
    page = render_quality_html(quality)
    assert page.startswith("<!doctype html>")
    assert "data:image/png;base64," in page
    assert "<td>a</td>" in page


# --------------------------------------------------------------------------------------------
# the transform module: one definition for training and serving


def test_transform_module_exports_with_a_dynamic_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "p": rng.normal(size=80),
            "q": rng.normal(size=80),
            "c": rng.choice(["u", "v", "w"], size=80),
            "y": rng.integers(0, 2, size=80),
        }
    )
    frame.loc[::7, "p"] = np.nan
    prepared, _ = prepare_frames(
        tmp_path,
        frame,
        missing={"strategy": "model"},
        outliers={"method": "iqr", "threshold": 1.0},
        scaling="standard",
    )
    module = transform_module(prepared.transform)
    example = torch.from_numpy(prepared.serving_rows("train")[:2])

    program = torch.export.export(
        module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )

    rows = torch.from_numpy(prepared.serving_rows("train"))
    torch.testing.assert_close(program.module()(rows), module(rows))
    torch.testing.assert_close(program.module()(rows), torch.from_numpy(prepared.x_train))
    unknown = torch.tensor([[np.nan, 0.5, 7.0], [0.1, np.nan, 1.5]], dtype=torch.float32)
    assert torch.isfinite(program.module()(unknown)).all()  # missing and invalid codes imputed


# --------------------------------------------------------------------------------------------
# the steps end to end


STEP_CASES = {
    "breast-cancer": ("label", {}),
    "digits": ("digit", {}),
    "reviews": ("sentiment", {}),
    "fraud": ("is_fraud", {"outliers": {"method": "iqr", "threshold": 3}}),
}


def run_steps(root: Path, name: str) -> tuple[Prepared, dict[str, Any], dict[str, Any]]:
    target, preprocessing = STEP_CASES[name]
    spec = make_spec(f"builtin://{name}", target, preprocessing=preprocessing)
    ingested, prepared = ingest_and_preprocess(root, spec, run_uri=f"file://{root}/run")
    results = {"ingest": ingested, "preprocess": prepared}
    return (
        load_prepared(root / "prepared"),
        results,
        json.loads((root / "raw/schema.json").read_text()),
    )


@pytest.fixture(scope="module")
def step_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {name: run_steps(tmp_path_factory.mktemp(name), name) for name in STEP_CASES}


@pytest.mark.parametrize(
    ("name", "modality", "shape", "classes"),
    [
        ("breast-cancer", "tabular", (30,), 2),
        ("digits", "image", (1, 8, 8), 10),
        ("reviews", "text", None, 2),
        ("fraud", "tabular", (24,), 2),
    ],
)
def test_steps_write_the_layouts(
    step_outputs: dict[str, Any],
    name: str,
    modality: str,
    shape: tuple[int, ...] | None,
    classes: int,
) -> None:
    prepared, results, schema = step_outputs[name]
    root = prepared.directory.parent

    for split in SPLITS:
        assert (root / "raw" / f"{split}.parquet").is_file()
        assert (root / "prepared" / f"{split}.npz").is_file()
    for file in (SCHEMA_FILE, TRANSFORM_FILE, QUALITY_FILE):
        assert (root / "prepared" / file).is_file()
    assert schema["modality"] == prepared.modality == modality
    assert len(schema["sha256"]) == 64
    assert schema["rows"]["total"] == results["ingest"].metrics["rows"]
    assert prepared.n_classes == classes == len(prepared.classes)
    if shape is not None:
        assert prepared.input_shape == shape
    assert prepared.x_train.shape[1:] == prepared.input_shape
    assert len(prepared.x_train) == len(prepared.y_train) == len(prepared.serving_rows("train"))
    assert prepared.y_train.dtype == np.int64
    assert set(np.unique(prepared.y_train)) == set(range(classes))
    assert results["ingest"].metrics["train_rows"] > results["ingest"].metrics["test_rows"] > 0
    assert results["preprocess"].published == {"data_quality_report": "reports/data-quality.html"}
    assert (root / "run/reports/data-quality.html").is_file()
    assert json.loads((root / "run/steps/preprocess.json").read_text())["message"]


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_transform_module_reproduces_the_prepared_arrays(
    step_outputs: dict[str, Any], name: str
) -> None:
    """Serving applies exactly the training transforms: the module over the serving rows gives
    the saved network inputs, bit for bit."""
    prepared = step_outputs[name][0]
    module = transform_module(prepared.transform)

    for split in SPLITS:
        x, _ = prepared.arrays(split)
        rows = prepared.serving_rows(split)
        assert rows.dtype == np.float32
        assert rows.shape == (len(x), len(prepared.serving_features))
        with torch.inference_mode():
            out = module(torch.from_numpy(rows)).numpy()
        np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("name", ["digits", "reviews", "fraud"])
def test_every_modality_exports_with_a_dynamic_batch(
    step_outputs: dict[str, Any], name: str
) -> None:
    prepared = step_outputs[name][0]
    module = transform_module(prepared.transform)
    rows = torch.from_numpy(prepared.serving_rows("validation"))

    program = torch.export.export(
        module, (rows[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )

    out = program.module()(rows[:37])
    torch.testing.assert_close(out, torch.from_numpy(prepared.x_validation[:37]))


def test_fraud_needs_imbalance_handling(step_outputs: dict[str, Any]) -> None:
    """The fraud set's design: unweighted, a model finds few frauds; rebalanced, most."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import recall_score

    prepared = step_outputs["fraud"][0]
    recalls = {}
    for weights in (None, "balanced"):
        model = LogisticRegression(max_iter=300, class_weight=weights)
        model.fit(prepared.x_train, prepared.y_train)
        recalls[weights] = recall_score(prepared.y_test, model.predict(prepared.x_test))

    assert recalls[None] < 0.3
    assert recalls["balanced"] > recalls[None] + 0.4


def test_reviews_text_has_synonyms_for_augmentation(step_outputs: dict[str, Any]) -> None:
    prepared = step_outputs["reviews"][0]
    vocab = prepared.transform["text"]["vocab"]

    great = vocab.index("great")
    assert {vocab[i] for i in prepared.synonyms[great]} <= {
        "excellent",
        "fantastic",
        "superb",
        "wonderful",
        "amazing",
    }


# --------------------------------------------------------------------------------------------
# augmentation


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augmentation_is_identity_when_all_zero() -> None:
    for modality, x in (
        ("image", torch.rand(4, 1, 8, 8)),
        ("text", torch.randint(0, 9, (4, 6))),
        ("tabular", torch.rand(4, 3)),
    ):
        out = augment_batch(
            x,
            modality=modality,
            augmentation=Augmentation(),
            generator=generator(),
            synonyms={2: [3]},
        )
        assert out is x


def test_flip_mirrors_some_images_exactly() -> None:
    images = torch.rand(32, 1, 8, 8)

    out = augment_batch(
        images, modality="image", augmentation=Augmentation(flip=True), generator=generator()
    )

    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, images, strict=True)]
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, images, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 4 < sum(mirrored) < 28


def _centroid(images: torch.Tensor) -> torch.Tensor:
    size = images.shape[-1]
    coords = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2).expand(size, size)
    mass = images.sum(dim=(-1, -2))
    return torch.stack(
        [(images * coords).sum(dim=(-1, -2)) / mass, (images * coords.T).sum(dim=(-1, -2)) / mass],
        dim=-1,
    ).reshape(len(images), 2)


def test_rotation_turns_images_within_the_limit() -> None:
    images = torch.zeros(64, 1, 33, 33)
    images[:, :, 16, 26] = 1.0  # a dot right of the centre, at angle 0

    out = augment_batch(
        images,
        modality="image",
        augmentation=Augmentation(rotation_degrees=30),
        generator=generator(),
    )

    x, y = _centroid(out).unbind(-1)
    angles = torch.rad2deg(torch.atan2(y, x)).abs()
    assert angles.max() <= 31
    assert angles.mean() > 5
    assert torch.hypot(x, y).sub(10).abs().max() < 1  # turned, not moved away


def test_scale_zooms_images_within_the_limit() -> None:
    images = torch.zeros(64, 1, 33, 33)
    images[:, :, 16, 26] = 1.0

    out = augment_batch(
        images, modality="image", augmentation=Augmentation(scale=0.3), generator=generator()
    )

    x, y = _centroid(out).unbind(-1)
    distance = torch.hypot(x, y)
    assert distance.min() >= 10 * 0.7 - 0.5
    assert distance.max() <= 10 * 1.3 + 0.5
    assert distance.std() > 0.5


@pytest.mark.parametrize(
    ("modality", "field"), [("image", "image_noise"), ("tabular", "tabular_noise")]
)
def test_gaussian_noise_has_the_configured_std(modality: str, field: str) -> None:
    x = torch.zeros(200, 1, 8, 8) if modality == "image" else torch.zeros(400, 32)

    out = augment_batch(
        x,
        modality=modality,
        augmentation=Augmentation.model_validate({field: 0.2}),
        generator=generator(),
    )

    assert out.std().item() == pytest.approx(0.2, rel=0.05)
    assert out.mean().item() == pytest.approx(0, abs=0.01)


def test_synonym_swap_replaces_words_with_synonyms_only() -> None:
    tokens = torch.tensor([[2, 5, 3, 0], [4, 2, 2, 0]])
    synonyms = {2: [3, 4], 3: [2, 4], 4: [2, 3]}

    always = augment_batch(
        tokens,
        modality="text",
        augmentation=Augmentation(synonym_swap=1.0),
        generator=generator(),
        synonyms=synonyms,
    )
    half = augment_batch(
        tokens.repeat(200, 1),
        modality="text",
        augmentation=Augmentation(synonym_swap=0.5),
        generator=generator(),
        synonyms=synonyms,
    )

    assert always.dtype == tokens.dtype
    for original, swapped in zip(tokens.flatten().tolist(), always.flatten().tolist(), strict=True):
        if original in synonyms:
            assert swapped in synonyms[original]
        else:
            assert swapped == original  # no synonyms (5) and padding (0) stay
    changed = (half != tokens.repeat(200, 1)).float().sum() / (200 * 5)  # 5 swappable tokens
    assert changed.item() == pytest.approx(0.5, abs=0.05)


def test_augmentation_is_reproducible_from_the_generator() -> None:
    images = torch.rand(8, 1, 8, 8)
    settings = Augmentation(rotation_degrees=15, flip=True, scale=0.1, image_noise=0.05)

    first = augment_batch(images, modality="image", augmentation=settings, generator=generator(3))
    again = augment_batch(images, modality="image", augmentation=settings, generator=generator(3))
    other = augment_batch(images, modality="image", augmentation=settings, generator=generator(4))

    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
