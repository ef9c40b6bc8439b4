"""The reference format and its bucket rule, on both sides: missing values in their own bucket
(in the training fractions and in the served counts), prediction edges shared by every version,
summary features for text and image models, and the runtime's ServingMetrics agreeing with
the contract bucket for bucket."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kubeloop.api.model_version import ModelVersionSpec
from kubeloop.contract import serving_metrics as names
from kubeloop.contract.reference import (
    CLASSIFIER_EDGES,
    IMAGE_SUMMARY,
    MISSING,
    TEXT_SUMMARY,
    bucket_index,
    histogram,
    image_summary,
    input_summary,
    labelled_fractions,
    manifest_reference,
    prediction_edges,
    quantile_edges,
    reference_from_data,
    summary_features,
    text_summary,
)
from kubeloop.contract.serving_metrics import bucket_labels
from kubeloop.serving.metrics import ServingMetrics

_versions = itertools.count()


def fresh_version() -> str:
    """A version label no other test used (the counters live in the process-wide registry)."""
    return f"ref-v{next(_versions)}"


def served(model: str, version: str, feature: str | None = None) -> dict[str, float]:
    """The exported counts of one version by ``bucket``, as ``sum by (bucket)`` reads them."""
    metric = names.FEATURE_BUCKETS if feature else names.PREDICTION_BUCKETS
    out: dict[str, float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == names.total(metric)
                and labels.get("model") == model
                and labels.get("version") == version
                and (feature is None or labels.get("feature") == feature)
            ):
                out[labels["bucket"]] = sample.value
    return out


# --- missing values -------------------------------------------------------------------------


def test_a_missing_value_has_its_own_bucket_not_bucket_zero() -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    got = bucket_index(edges, [-1.0, 0.0, 1.5, 3.0, 99.0, np.nan]).tolist()
    assert got == [0, 0, 1, 2, 2, 3]  # clipped at both ends; NaN → the missing bucket (3)
    assert bucket_labels(3) == ["0", "1", "2", MISSING]


def test_reference_fractions_carry_the_missing_share_of_the_raw_training_values() -> None:
    values = np.arange(100, dtype=np.float64)
    values[::4] = np.nan  # a quarter of the training rows miss the feature
    ref = reference_from_data(values[:, None], ["v"], np.full(100, 0.5), task="classification")
    hist = ref["features"]["v"]
    assert len(hist["fractions"]) == len(hist["edges"]) == 11  # 10 buckets + the missing share
    assert hist["fractions"][-1] == pytest.approx(0.25)
    assert sum(hist["fractions"]) == pytest.approx(1.0)
    # the edges are quantiles of the values that are there (no median imputation pulling them)
    assert hist["edges"] == quantile_edges(values[~np.isnan(values)])
    assert hist["fractions"][:10] == pytest.approx([0.075] * 10, abs=0.006)
    labelled = labelled_fractions(hist)
    assert labelled[MISSING] == pytest.approx(0.25)
    assert set(labelled) == {*(str(b) for b in range(10)), MISSING}
    # a reference of the older format (no missing share) reads as 0 missing
    assert labelled_fractions({"edges": [0, 1, 2], "fractions": [0.5, 0.5]}) == {
        "0": 0.5, "1": 0.5, MISSING: 0.0,
    }  # fmt: skip


def test_constant_and_empty_features_still_have_a_bucket() -> None:
    const = reference_from_data(np.ones((10, 1)), ["c"], np.zeros(10), task="regression")
    assert const["features"]["c"] == {"edges": [1.0, 1.0], "fractions": [1.0, 0.0], "rows": 10}
    assert const["prediction"]["rows"] == 10
    empty = histogram(np.full(4, np.nan), quantile_edges(np.full(4, np.nan)))
    assert empty == {"edges": [0.0, 0.0], "fractions": [0.0, 1.0]}


def test_served_counts_put_nan_in_the_missing_bucket_and_agree_with_the_contract() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    reference = reference_from_data(x, ["a", "b", "c"], rng.random(500), task="classification")
    version = fresh_version()
    metrics = ServingMetrics("ref", version, task="classification", reference=reference)
    traffic = rng.normal(size=(300, 3)).astype(np.float32) * 2
    traffic[:30, 1] = np.nan
    want = np.stack(
        [
            bucket_index(reference["features"][n]["edges"], traffic[:, i])
            for i, n in enumerate("abc")
        ],
        axis=1,
    )
    np.testing.assert_array_equal(metrics.feature_buckets(traffic), want)
    before = served("ref", version, "b")
    assert before == dict.fromkeys(bucket_labels(10), 0.0)  # every bucket exported at zero
    metrics.observe(traffic, np.stack([1 - traffic[:, 0], traffic[:, 0]], axis=1))
    got = served("ref", version, "b")
    assert got[MISSING] == 30
    assert got["0"] == int((want[:, 1] == 0).sum())  # the NaNs are not in bucket 0
    assert sum(got.values()) == 300


# --- predictions -----------------------------------------------------------------------------


def test_classifier_predictions_use_fixed_edges_shared_by_every_version() -> None:
    assert list(CLASSIFIER_EDGES) == pytest.approx([i / 10 for i in range(11)])
    a = reference_from_data(np.ones((4, 1)), ["f"], [[0.9, 0.1]] * 4, task="classification")
    b = reference_from_data(np.ones((4, 1)), ["f"], [[0.2, 0.8]] * 4, task="classification")
    assert a["prediction"]["edges"] == b["prediction"]["edges"] == list(CLASSIFIER_EDGES)
    assert a["prediction"]["fractions"][1] == 1.0  # P(positive) 0.1 is in [0.1, 0.2)
    assert b["prediction"]["fractions"][8] == 1.0
    # the runtime uses the fixed edges whatever an older artifact's reference says
    old = {"prediction": {"edges": [0.0, 0.03, 0.5, 0.97, 1.0], "fractions": [0.25] * 4}}
    metrics = ServingMetrics("ref", fresh_version(), task="classification", reference=old)
    assert metrics.prediction_edges.tolist() == list(CLASSIFIER_EDGES)


def test_regression_edges_are_the_first_versions_carried_forward() -> None:
    scores = np.linspace(0.0, 100.0, 101)
    own = prediction_edges("regression", scores)
    assert own == quantile_edges(scores)
    first = [0.0, 10.0, 20.0, 50.0]
    ref = reference_from_data(
        np.ones((101, 1)), ["f"], scores, task="regression", shared_prediction_edges=first
    )
    assert ref["prediction"]["edges"] == first
    assert ref["prediction"]["fractions"] == pytest.approx([10 / 101, 10 / 101, 81 / 101, 0.0])
    # the runtime: --prediction-edges wins over the artifact's own edges
    version = fresh_version()
    metrics = ServingMetrics(
        "ref", version, task="regression", reference={"prediction": {"edges": own}},
        prediction_edges=tuple(first),
    )  # fmt: skip
    metrics.observe(np.ones((4, 1), np.float32), np.array([5.0, 15.0, 70.0, np.nan], np.float32))
    assert served("ref", version) == {"0": 1.0, "1": 1.0, "2": 1.0, MISSING: 1.0}
    # without shared edges: the artifact's own; with neither: no prediction histogram
    by_own = ServingMetrics(
        "ref", fresh_version(), task="regression", reference={"prediction": {"edges": own}}
    )
    assert by_own.prediction_edges.tolist() == own
    bare = ServingMetrics("ref", fresh_version(), task="regression", reference={})
    assert bare.prediction_edges.size == 0


# --- text and image models ---------------------------------------------------------------------


def test_text_models_are_described_by_length_and_out_of_vocabulary_rate() -> None:
    summary = text_summary(vocab_size=50)
    ids = np.array(
        [
            [5, 6, 7, 0, 0, 0],  # 3 known words, padded
            [5, 1, 60, 8, np.nan, np.nan],  # 4 words: one unknown, one beyond the vocabulary
            [0, 0, 0, 0, 0, 0],  # an empty text: its OOV rate is missing
        ],
        dtype=np.float32,
    )
    got = input_summary(summary, ids)
    np.testing.assert_allclose(got[:2], [[3, 0.0], [4, 0.5]])
    assert got[2, 0] == 0
    assert np.isnan(got[2, 1])
    ref = reference_from_data(ids, [f"tok_{i}" for i in range(6)], [0.5] * 3, summary=summary)
    assert list(ref["features"]) == list(TEXT_SUMMARY)  # not tok_0 .. tok_5
    assert ref["summary"] == summary
    assert ref["features"]["oov_rate"]["fractions"][-1] == pytest.approx(1 / 3)


def test_image_models_are_described_by_brightness_and_contrast() -> None:
    pixels = np.array([[0.0, 1.0, 0.0, 1.0], [0.5, 0.5, np.nan, 0.5], [np.nan] * 4])
    got = input_summary(image_summary(), pixels)
    np.testing.assert_allclose(got[:2], [[0.5, 0.5], [0.5, 0.0]])
    assert np.isnan(got[2]).all()  # every pixel missing: both summaries missing
    ref = reference_from_data(pixels, ["p0", "p1", "p2", "p3"], [0.5] * 3, summary=image_summary())
    assert list(ref["features"]) == list(IMAGE_SUMMARY)
    assert summary_features(ref["summary"]) == IMAGE_SUMMARY
    assert summary_features(None) == ()
    with pytest.raises(ValueError, match=r"summary\.modality='audio'"):
        summary_features({"modality": "audio"})


def test_the_runtime_counts_the_summary_features_of_text_traffic() -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(2, 50, size=(200, 16)).astype(np.float32)
    train[rng.random(train.shape) < 0.1] = 1  # some unknown words
    train[:, 10:] = 0  # padding
    summary = text_summary(50)
    ref = reference_from_data(
        train, [f"tok_{i}" for i in range(16)], rng.random(200), task="classification",
        summary=summary,
    )  # fmt: skip
    version = fresh_version()
    metrics = ServingMetrics("ref", version, task="classification", reference=ref)
    assert metrics.feature_names == list(TEXT_SUMMARY)
    traffic = train[:20].copy()
    traffic[:10, :5] = 1  # half the requests: five unknown words each
    traffic[10:12] = np.nan  # two empty texts (all padding)
    metrics.observe(traffic, np.full((20, 2), 0.5, np.float32))
    for i, feature in enumerate(TEXT_SUMMARY):
        edges = ref["features"][feature]["edges"]
        buckets = bucket_index(edges, input_summary(summary, traffic)[:, i])
        want = np.bincount(buckets, minlength=len(edges))
        got = served("ref", version, feature)
        assert [got[label] for label in bucket_labels(len(edges) - 1)] == want.tolist()
    assert served("ref", version, "oov_rate")[MISSING] == 2
    assert served("ref", version, "oov_rate")[bucket_labels(len(edges) - 1)[-2]] >= 10
    assert not served("ref", version, "tok_0")  # no per-position series at all
    with pytest.raises(ValueError, match="describes the features"):
        ServingMetrics(
            "ref", fresh_version(), task="regression",
            reference={**ref, "features": {"tok_0": ref["features"]["oov_rate"]}},
        )  # fmt: skip


# --- the ModelVersion --------------------------------------------------------------------------


def test_the_manifest_reference_fits_the_model_version() -> None:
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    x[0, 1] = np.nan
    ref = reference_from_data(x, ["a", "b"], np.linspace(0, 1, 20), task="classification")
    out = manifest_reference(ref)
    assert [f["name"] for f in out["reference"]] == ["a", "b"]
    assert out["predictionReference"] == ref["prediction"]
    spec = ModelVersionSpec.model_validate({
        "modelName": "m", "version": 1, "artifact": {"uri": "file:///m"}, **out,
    })  # fmt: skip
    assert spec.reference[1].fractions[-1] == pytest.approx(0.05)
    assert spec.prediction_reference is not None
    with pytest.raises(ValueError, match="at most 63"):
        manifest_reference({"features": {"wide": {"edges": list(range(70)), "fractions": []}}})
