"""Evaluation: metrics against hand-computed values, the learning-curve verdict on synthetic
histories, registration gates, serving cost of a real artifact, plots and the report; and the
register step's ModelVersion manifest of what passed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kubeloop.api.model_version import ModelVersionSpec
from kubeloop.api.training_run import Gate, TrainingRunSpec
from kubeloop.contract.artifact import METADATA_FILE, REGISTRY_FORMAT, digest
from kubeloop.contract.reference import CLASSIFIER_EDGES
from kubeloop.contract.steps import MANIFEST_FILE, MODEL_DIR
from kubeloop.serving.artifact import load_model
from kubeloop.serving.samples import breast_cancer, train_tabular_model
from kubeloop_pipelines.contract import StepError, StepResult
from kubeloop_pipelines.ml.evaluate import (
    check_gates,
    compute_metrics,
    confusion,
    evaluation_report,
    gate_summary,
    learning_curve_verdict,
    plot_confusion,
    plot_learning_curves,
    plot_roc_pr,
    roc_points,
    serving_cost,
)
from kubeloop_pipelines.ml.preprocess import load_prepared
from kubeloop_pipelines.progress import StepReport
from kubeloop_pipelines.steps import evaluate as evaluate_step
from kubeloop_pipelines.steps import register as register_step
from tests.unit.pipelines.conftest import spec_for

# --- metrics -----------------------------------------------------------------------------

# 8 rows, class 1 is the positive (last) class: TP 2 (rows 4, 5), FP 1 (row 2), FN 1 (row 6).
Y_BINARY = np.array([0, 0, 0, 0, 1, 1, 1, 0])
P_POSITIVE = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.05])
PROBA_BINARY = np.stack([1 - P_POSITIVE, P_POSITIVE], axis=1)


def test_binary_metrics_match_hand_computed_values() -> None:
    m = compute_metrics("classification", Y_BINARY, PROBA_BINARY, classes=["no", "yes"])
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["minority_recall"] == pytest.approx(2 / 3)  # class 1 is also the rarer one
    # 14 of the 15 (positive, negative) pairs are ordered correctly (0.4 < 0.6).
    assert m["roc_auc"] == pytest.approx(14 / 15)
    # Ranked: P P N P ... → precision at each positive 1, 1, 3/4.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 0.75) / 3)


def test_multiclass_metrics_are_macro_averages() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = compute_metrics("classification", y, pred, classes=["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["minority_recall"] == pytest.approx(1 / 2)  # a tie: the first class, a
    assert "roc_auc" not in m  # labels only: no ranking metrics
    one_hot = np.eye(3)[pred] * 0.8 + 0.2 / 3
    with_proba = compute_metrics("classification", y, one_hot, classes=["a", "b", "c"])
    assert 0 < with_proba["roc_auc"] <= 1
    assert 0 < with_proba["pr_auc"] <= 1


def test_regression_metrics_match_hand_computed_values() -> None:
    m = compute_metrics("regression", [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    assert m == pytest.approx({"mse": 0.25, "rmse": 0.5, "mae": 0.25, "r2": 1 - 1 / 5})


def test_confusion_and_roc_points() -> None:
    labels, matrix = confusion(Y_BINARY, PROBA_BINARY, ["no", "yes"])
    assert labels == ["no", "yes"]
    assert matrix == [[4, 1], [1, 2]]
    fpr, tpr, thresholds = roc_points(Y_BINARY, PROBA_BINARY)
    assert fpr[0] == 0
    assert tpr[-1] == 1
    assert fpr[-1] == 1
    assert all(math.isfinite(t) and t <= 1 for t in thresholds)


# --- learning curves ---------------------------------------------------------------------


def _history(train: list[float], val: list[float], **extra: object) -> dict[str, object]:
    epochs = [
        {"epoch": i + 1, "train_loss": t, "val_loss": v}
        for i, (t, v) in enumerate(zip(train, val, strict=True))
    ]
    return {"epochs": epochs, **extra}


DECAY = [0.7 * math.exp(-e / 3) + 0.1 for e in range(20)]


def test_verdict_overfit_when_validation_rises_while_train_falls() -> None:
    train = list(np.linspace(0.7, 0.05, 20))
    val = [0.7 - 0.05 * e for e in range(8)] + [0.35 + 0.03 * e for e in range(12)]
    verdict, why = learning_curve_verdict(_history(train, val))
    assert verdict == "overfit"
    assert "epoch 8" in why
    assert "rose" in why


def test_verdict_good_fit_when_early_stopping_kept_the_minimum() -> None:
    train = list(np.linspace(0.7, 0.2, 12))
    val = [0.7 - 0.05 * e for e in range(8)] + [0.35 + 0.03 * e for e in range(4)]
    verdict, why = learning_curve_verdict(_history(train, val, best_epoch=8))
    assert verdict == "good fit"
    assert "kept the epoch-8 weights" in why


def test_verdict_overfit_on_a_large_generalisation_gap() -> None:
    verdict, why = learning_curve_verdict(_history([0.5, 0.1, 0.02, 0.01], [0.6, 0.5, 0.5, 0.5]))
    assert verdict == "overfit"
    assert "training loss" in why


def test_verdict_underfit_when_flat_or_still_falling_or_too_short() -> None:
    flat = [0.69, 0.688, 0.687, 0.686, 0.686]
    assert learning_curve_verdict(_history(flat, flat))[0] == "underfit"
    falling = list(np.linspace(1.0, 0.3, 10))
    verdict, why = learning_curve_verdict(_history(falling, [v + 0.05 for v in falling]))
    assert verdict == "underfit"
    assert "still falling" in why
    high = list(np.linspace(1.0, 0.6, 10)) + [0.6] * 10
    verdict, why = learning_curve_verdict(_history(high, high), baseline_loss=math.log(2))
    assert verdict == "underfit"
    assert "guessing" in why
    assert learning_curve_verdict(_history([0.5, 0.4], [0.5, 0.4]))[0] == "underfit"


def test_verdict_good_fit_on_converged_curves() -> None:
    verdict, _ = learning_curve_verdict(_history(DECAY, [v + 0.03 for v in DECAY]))
    assert verdict == "good fit"


# --- gates -------------------------------------------------------------------------------


def test_gates_pass_fail_and_summary() -> None:
    metrics = {"f1": 0.95, "latency_ms": 2.0}
    gates = [Gate(metric="f1", op=">=", value=0.9), Gate(metric="latency_ms", op="<", value=5)]
    passed, results = check_gates(gates, metrics, "classification")
    assert passed
    assert [r["passed"] for r in results] == [True, True]
    assert gate_summary(results) == "f1=0.95>=0.9 ✓ latency_ms=2<5 ✓"
    passed, results = check_gates(
        [*gates, Gate(metric="roc_auc", op=">", value=0.5)], metrics, "classification"
    )
    assert not passed
    assert results[2]["actual"] is None
    assert "not measurable" in results[2]["text"]
    passed, results = check_gates(
        [Gate(metric="f1", op=">", value=0.99)], metrics, "classification"
    )
    assert not passed
    assert results[0]["text"] == "f1=0.95>0.99 ✗"


def test_gate_on_a_metric_the_task_does_not_produce_names_the_field() -> None:
    gates = [Gate(metric="f1", value=0.5), Gate(metric="mse", op="<=", value=1)]
    with pytest.raises(StepError) as caught:
        check_gates(gates, {"f1": 0.9}, "classification")
    assert caught.value.field == "evaluation.gates[1].metric"
    assert "'mse'" in caught.value.message
    assert "accuracy" in caught.value.message
    with pytest.raises(StepError, match="r2"):
        check_gates([Gate(metric="f1", value=0.5)], {}, "regression")


# --- serving cost, plots and the report --------------------------------------------------


def test_serving_cost_of_a_real_artifact(tmp_path: Path) -> None:
    model_dir = train_tabular_model(tmp_path, epochs=2)
    x, _, _ = breast_cancer()
    cost = serving_cost(load_model(model_dir), model_dir, x[:10])
    assert 0 < cost["latency_ms"] < 1000
    assert cost["size_mb"] == pytest.approx((model_dir / "model.pt2").stat().st_size / 1e6)


def test_plots_and_report_are_self_contained() -> None:
    labels, matrix = confusion(Y_BINARY, PROBA_BINARY, ["no", "yes"])
    history = _history(DECAY, [v + 0.03 for v in DECAY])
    plots = {
        "confusion": plot_confusion(labels, matrix),
        "roc_pr": plot_roc_pr(Y_BINARY, PROBA_BINARY, ["no", "yes"]),
        "learning_curves": plot_learning_curves(history, "good fit"),
    }
    assert all(png.startswith(b"\x89PNG") for png in plots.values())
    metrics = compute_metrics("classification", Y_BINARY, PROBA_BINARY, classes=["no", "yes"])
    passed, gates = check_gates([Gate(metric="f1", value=0.9)], metrics, "classification")
    html = evaluation_report(
        metrics=metrics, gates=gates, passed=passed, verdict=("good fit", "fine"), plots=plots
    )
    assert html.count("data:image/png;base64,") == 3
    assert "gates failed" in html
    assert "roc_auc" in html
    assert "good fit" in html
    assert "http" not in html  # nothing fetched from elsewhere


# --- the step, end to end ----------------------------------------------------------------


def run_evaluate(spec: TrainingRunSpec, dirs: tuple[Path, Path], tmp: Path) -> StepResult:
    return evaluate_step.run(
        spec, report=StepReport(f"file://{tmp}/run", "evaluate"), run_uri=f"file://{tmp}/run",
        prepared_dir=dirs[0], model_dir=dirs[1], evaluation_path=tmp / "evaluation.json",
        report_html=tmp / "evaluation.html",
    )  # fmt: skip


def test_evaluate_step_scores_the_serving_artifact(
    cancer_model: tuple[Path, Path], tmp_path: Path
) -> None:
    gates = [{"metric": "f1", "value": 0.8}, {"metric": "latency_ms", "op": "<", "value": 1000},
             {"metric": "size_mb", "op": "<", "value": 50}]  # fmt: skip
    spec = spec_for("builtin://breast-cancer", "label", evaluation={"gates": gates})
    result = run_evaluate(spec, cancer_model, tmp_path)

    prepared = load_prepared(cancer_model[0])
    served = load_model(cancer_model[1]).predict(prepared.serving_rows("test"))
    expected = compute_metrics("classification", prepared.y_test, served, classes=["0", "1"])
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value)
    assert result.metrics["accuracy"] > 0.85
    assert result.outputs["gates_passed"] is True
    assert result.outputs["gate_summary"].startswith("f1=")
    assert result.outputs["gate_summary"].count("✓") == 3
    assert result.confusion is not None
    assert sum(map(sum, result.confusion[1])) == len(prepared.y_test)
    assert result.roc is not None
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["gatesPassed"] is True
    assert evaluation["verdict"]["verdict"] in ("overfit", "underfit", "good fit")
    assert evaluation["metrics"]["latency_ms"] > 0
    run_dir = tmp_path / "run"
    for name in result.published.values():
        assert (run_dir / name).is_file(), name
    assert {"evaluation_report", "metrics", "plot_evaluation_confusion"} <= set(result.published)


def test_evaluate_step_fails_gates_and_rejects_a_wrong_metric(
    cancer_model: tuple[Path, Path], tmp_path: Path
) -> None:
    impossible = [{"metric": "accuracy", "op": ">", "value": 1.0}]
    spec = spec_for("builtin://breast-cancer", "label", evaluation={"gates": impossible})
    result = run_evaluate(spec, cancer_model, tmp_path)
    assert result.outputs["gates_passed"] is False
    assert "✗" in result.outputs["gate_summary"]
    assert json.loads((tmp_path / "evaluation.json").read_text())["gatesPassed"] is False
    rmse = [{"metric": "rmse", "op": "<", "value": 1}]
    wrong = spec_for("builtin://breast-cancer", "label", evaluation={"gates": rmse})
    with pytest.raises(StepError) as caught:
        run_evaluate(wrong, cancer_model, tmp_path)
    assert caught.value.field == "evaluation.gates[0].metric"


# --- register: the manifest of what passed -----------------------------------------------


def test_register_step_carries_the_feature_and_prediction_references(
    cancer_model: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = spec_for("builtin://breast-cancer", "label")  # no gates: they pass
    run_evaluate(spec, cancer_model, tmp_path)
    run_uri = f"file://{tmp_path}/run"
    result = register_step.run(
        spec, report=StepReport(run_uri, "register"), run_uri=run_uri,
        raw_dir=cancer_model[0].parent / "raw", model_dir=cancer_model[1],
        evaluation_path=tmp_path / "evaluation.json", manifest_path=tmp_path / "manifest.json",
    )  # fmt: skip

    model_json = json.loads((cancer_model[1] / METADATA_FILE).read_text())
    reference = model_json["reference"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert json.loads((tmp_path / "run" / MANIFEST_FILE).read_text()) == manifest
    spec_out = manifest["spec"]
    prediction = spec_out["predictionReference"]
    assert prediction["edges"] == reference["prediction"]["edges"]
    assert prediction["fractions"] == reference["prediction"]["fractions"]
    # one fraction a bucket, then the missing share; on the classifier's fixed score edges
    assert len(prediction["edges"]) == len(prediction["fractions"]) >= 2
    assert prediction["edges"] == list(CLASSIFIER_EDGES)
    assert [f["name"] for f in spec_out["reference"]] == model_json["features"]
    for feature in spec_out["reference"]:
        expected = reference["features"][feature["name"]]
        assert feature == {"name": feature["name"], **expected}
    assert spec_out["artifact"]["format"] == REGISTRY_FORMAT
    assert spec_out["artifact"]["sha256"] == digest(tmp_path / "run" / MODEL_DIR)
    assert result.published == {"model": MODEL_DIR, "manifest": MANIFEST_FILE}

    version = ModelVersionSpec.model_validate({**spec_out, "modelName": "cancer", "version": 1})
    assert version.prediction_reference is not None
    assert version.prediction_reference.edges == reference["prediction"]["edges"]
    assert version.prediction_reference.fractions == reference["prediction"]["fractions"]
    assert len(version.reference) == len(model_json["features"])
