"""The demo's world (``hack/demo_data.py``) keeps its promises, without training an MLP: seeded,
three features drift (PSI on the reference's 10 quantile buckets, as the DriftPolicy computes
it) and three do not, the label relation changes (a logistic regression fitted before the shift
is near chance after it, one fitted after recovers), and ``evaluate`` scores an artifact exactly
as the serving runtime loads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hack.demo_data import (
    CLASSES,
    FEATURES,
    SHIFTED,
    TARGET,
    evaluate,
    feature_psi,
    generate,
    scores,
    traffic,
    training_spec,
    write_training_csv,
)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.reference import reference_from_data
from kubeloop.serving.artifact import save_model
from kubeloop_pipelines.compiler import selected_steps

ROWS = 2000
UNSHIFTED = tuple(f for f in FEATURES if f not in SHIFTED)


def fit_logistic(frame: pd.DataFrame) -> Pipeline:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return model.fit(frame[list(FEATURES)], frame[TARGET])


def accuracy(model: Pipeline, frame: pd.DataFrame) -> float:
    return float(accuracy_score(frame[TARGET], model.predict(frame[list(FEATURES)])))


def test_the_table_is_seeded_and_shaped() -> None:
    first = generate("before", 500, seed=3)
    assert list(first.columns) == [*FEATURES, TARGET]
    pd.testing.assert_frame_equal(first, generate("before", 500, seed=3))
    assert not first.equals(generate("before", 500, seed=4))
    # One seed, two regimes: independent draws, not the same noise moved.
    after = generate("after", 500, seed=3)
    assert not np.allclose(first["merchant_risk"], after["merchant_risk"])
    assert set(first[TARGET].unique()) == {0, 1}
    assert first[TARGET].dtype == np.int64
    assert not first.isna().any().any()
    assert (first[list(FEATURES)] >= 0).all().all()
    assert first["hour_of_day"].max() < 24
    assert first["merchant_risk"].max() <= 1


@pytest.mark.parametrize("regime", ["before", "after"])
def test_classes_are_balanced_enough_for_accuracy_and_f1_to_move(regime: str) -> None:
    for seed in (1, 2, 3):
        share = generate(regime, ROWS, seed)[TARGET].mean()  # type: ignore[arg-type]
        assert 0.2 <= share <= 0.5, (regime, seed, share)


def test_unknown_regime_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="regime='during'"):
        generate("during", 10, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rows=0"):
        generate("before", 0, 1)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_three_features_drift_and_three_do_not(seed: int) -> None:
    reference = generate("before", ROWS, seed)
    psi = feature_psi(reference, generate("after", ROWS, seed + 10))
    assert all(psi[f] > 0.2 for f in SHIFTED), psi
    assert all(psi[f] < 0.05 for f in UNSHIFTED), psi
    # A few hundred served rows already show it (the demo's drift window).
    small = feature_psi(reference, generate("after", 300, seed + 10))
    assert min(small[f] for f in SHIFTED) > 0.5, small
    # The same regime again is no drift.
    same = feature_psi(reference, generate("before", ROWS, seed + 10))
    assert max(same.values()) < 0.05, same


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_label_relation_changes(seed: int) -> None:
    before, after = generate("before", 3000, seed), generate("after", 3000, seed)
    held_before, held_after = generate("before", ROWS, seed + 1), generate("after", ROWS, seed + 1)
    old = fit_logistic(before)
    assert accuracy(old, held_before) >= 0.85
    assert accuracy(old, held_after) <= 0.65  # near chance: the shift broke it
    new = fit_logistic(after)
    assert accuracy(new, held_after) >= accuracy(old, held_after) + 0.2
    # The relation itself moved, not only the inputs: the amount's effect flips sign.
    amount = FEATURES.index("amount")
    assert old[-1].coef_[0][amount] > 0 > new[-1].coef_[0][amount]


def test_traffic_yields_seeded_request_batches_with_their_labels() -> None:
    batches = list(traffic("after", seed=5, batch_size=7, batches=300))
    assert len(batches) == 300
    rows, labels = batches[0]
    assert len(rows) == len(labels) == 7
    assert all(len(row) == len(FEATURES) for row in rows)
    assert all(isinstance(v, float) for v in rows[0])
    assert {label for _, ls in batches for label in ls} == {0, 1}
    assert batches == list(traffic("after", seed=5, batch_size=7, batches=300))
    # Past one chunk of rows the stream stays fresh (no repeated block).
    flat = [tuple(row) for rs, _ in batches for row in rs]
    assert len(set(flat)) == len(flat)
    served = pd.DataFrame(flat, columns=list(FEATURES))
    psi = feature_psi(generate("before", ROWS, 1), served)
    assert min(psi[f] for f in SHIFTED) > 0.2, psi


def test_write_training_csv_round_trips(tmp_path: Path) -> None:
    path = write_training_csv(tmp_path / "data" / "payments.csv", 300, seed=2)
    frame = pd.read_csv(path)
    expected = generate("before", 300, 2)
    assert list(frame.columns) == list(expected.columns)
    np.testing.assert_allclose(frame[list(FEATURES)], expected[list(FEATURES)], rtol=1e-9)
    assert (frame[TARGET] == expected[TARGET]).all()


def test_training_spec_is_a_small_valid_trainingrun() -> None:
    spec = TrainingRunSpec.model_validate(training_spec("file:///tmp/x.csv", "payments", "latest"))
    assert selected_steps(spec) == ("ingest", "preprocess", "train", "evaluate", "register")
    assert spec.data.target == TARGET
    assert spec.registration.model_name == "payments"
    assert spec.registration.alias == "latest"
    assert [g.metric for g in spec.evaluation.gates] == ["accuracy"]
    assert spec.model.epochs <= 20
    retrain = training_spec("file:///tmp/requests", "payments", None, data_format="requestLog")
    assert TrainingRunSpec.model_validate(retrain).data.format == "requestLog"


def test_scores_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    got = scores(truth.astype(str), predicted.astype(str))
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert got["f1"] == pytest.approx(f1_score(truth, predicted))
    assert scores(["0", "0"], ["0", "0"])["f1"] == 0.0


def test_evaluate_loads_the_artifact_as_the_runtime_does(tmp_path: Path) -> None:
    """A logistic regression saved as a kubeloop artifact scores what scikit-learn scores."""
    train, held_out = generate("before", 3000, 1), generate("before", 1000, 2)
    fitted = fit_logistic(train)
    scaler, logistic = fitted[0], fitted[-1]
    linear = torch.nn.Linear(len(FEATURES), 2)
    with torch.no_grad():  # logits [0, w.x + b]: softmax gives the logistic probabilities
        linear.weight.copy_(torch.tensor(np.stack([np.zeros(6), logistic.coef_[0]])))
        linear.bias.copy_(torch.tensor([0.0, float(logistic.intercept_[0])]))
    x = train[list(FEATURES)].to_numpy()
    directory = save_model(
        tmp_path / "payments-v1" / "model",
        linear,
        task="classification",
        features=FEATURES,
        classes=CLASSES,
        mean=scaler.mean_.tolist(),
        scale=scaler.scale_.tolist(),
        reference=reference_from_data(x, FEATURES, fitted.predict_proba(train[list(FEATURES)])),
    )
    expected = scores(held_out[TARGET].astype(str), fitted.predict(held_out[list(FEATURES)]))
    # Columns in another order, and the artifact named by its file:// URI.
    shuffled = held_out[[TARGET, *reversed(FEATURES)]]
    got = evaluate(f"file://{directory}", shuffled)
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-3)
    assert got["f1"] == pytest.approx(expected["f1"], abs=1e-2)
    assert got == evaluate(directory, held_out)
    with pytest.raises(ValueError, match="merchant_risk"):
        evaluate(directory, held_out.drop(columns=["merchant_risk"]))
