"""Gradient-boosted trees (model.family: lightgbm): training, the ONNX artifact the runtime
serves, TreeSHAP and the decision path, and how optimize/register treat a forest. Real
lightgbm, onnxruntime and the real pipeline steps; small tables, seconds each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubeloop.api.training_run import Imbalance, ModelSpec
from kubeloop.contract.artifact import METADATA_FILE, ONNX_FILE, TRANSFORM_PROGRAM_FILE
from kubeloop.serving.artifact import ArtifactError, load_model
from kubeloop.serving.onnx_model import OnnxModel, onnx_session
from kubeloop_pipelines.contract import StepError
from kubeloop_pipelines.ml import gbdt
from kubeloop_pipelines.ml.evaluate import compute_metrics
from kubeloop_pipelines.ml.gbdt_explain import decision_path, explain_trees, tree_shap
from kubeloop_pipelines.ml.models import apply_params
from kubeloop_pipelines.ml.preprocess import load_prepared
from kubeloop_pipelines.progress import StepReport
from tests.unit.pipelines.conftest import make_spec, one_thread, trained

__all__ = ["one_thread"]  # the conftest fixture: one torch (and so lightgbm) thread

Arrays = tuple[np.ndarray[Any, Any], ...]
TREES = {"family": "lightgbm", "trees": {"nEstimators": 400, "numLeaves": 15}}


def decisive_table(n: int = 3000, seed: int = 0) -> Arrays:
    """Six noise features; the label is feature 3 > 0.2 (so feature 3 decides everything)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 3] > 0.2).astype(np.int64)
    return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


def imbalanced_table(n: int = 6000, seed: int = 1) -> Arrays:
    """About 3 % positives that overlap the negatives: weighting moves the 0.5 threshold."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.03).astype(np.int64)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    x[:, :2] += y[:, None] * 1.2
    return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


def fit(arrays: Arrays, **model: Any) -> gbdt.GbdtFit:
    xtr, ytr, xva, yva = arrays
    imbalance = Imbalance(strategy=model.pop("strategy", "none"))
    spec = ModelSpec.model_validate({"family": "lightgbm"} | model)
    return gbdt.fit_gbdt(
        xtr, ytr, xva, yva, task="classification", model=spec, n_classes=2,
        imbalance=imbalance, metric="f1",
    )  # fmt: skip


# --- training --------------------------------------------------------------------------------


def test_early_stopping_stops_and_keeps_the_best_round() -> None:
    result = fit(decisive_table(), trees={"nEstimators": 2000, "learningRate": 0.3})
    assert result.stopped_early
    assert result.epochs_run < 2000
    assert result.best_epoch == result.epochs_run - 5  # patience 5 rounds past the best
    assert result.booster.current_iteration() == result.best_epoch  # cut to the kept round
    # the history has the MLP's shape, so the learning-curve verdict reads it
    epochs = result.history_json()["epochs"]
    assert {"epoch", "train_loss", "val_loss", "val_metric"} <= set(epochs[0])
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert result.kept.val_metric > 0.95


def test_without_early_stopping_every_round_runs() -> None:
    result = fit(decisive_table(), trees={"nEstimators": 30}, earlyStopping=None)
    assert not result.stopped_early
    assert result.epochs_run == result.best_epoch == 30


def test_class_weights_raise_minority_recall() -> None:
    arrays = imbalanced_table()
    _, _, xva, yva = arrays

    def recall(strategy: str) -> float:
        booster = fit(arrays, strategy=strategy, trees={"numLeaves": 7}).booster
        out = gbdt.predict_booster(booster, xva, "classification")
        return compute_metrics("classification", yva, out, classes=["0", "1"])["minority_recall"]

    plain, weighted = recall("none"), recall("class_weights")
    assert weighted > plain + 0.2, (plain, weighted)


def test_focal_loss_is_refused_for_trees() -> None:
    with pytest.raises(StepError, match="focal_loss") as info:
        fit(decisive_table(), strategy="focal_loss")
    assert info.value.field == "imbalance.strategy"


def test_tree_settings_are_tunable_by_spec_name() -> None:
    model, _ = apply_params(
        ModelSpec(family="lightgbm"), Imbalance(), {"model.trees.numLeaves": "63"}
    )
    assert model.trees is not None
    assert model.trees.num_leaves == 63
    with pytest.raises(StepError) as info:
        apply_params(ModelSpec(family="lightgbm"), Imbalance(), {"trees.numLeaves": 1})
    assert info.value.field == "model.trees.numLeaves"


# --- ONNX ------------------------------------------------------------------------------------


def test_onnx_export_predicts_what_lightgbm_predicts() -> None:
    arrays = decisive_table()
    booster = fit(arrays).booster
    onnx_bytes, output = gbdt.export_onnx(booster, 6)
    (got,) = onnx_session(onnx_bytes).run([output], {gbdt.ONNX_INPUT: arrays[2]})
    expected = gbdt.predict_booster(booster, arrays[2], "classification")
    np.testing.assert_allclose(got, expected, atol=gbdt.PARITY_TOLERANCE)
    parity = gbdt.onnx_parity(onnx_bytes, output, booster, arrays[2], "classification")
    assert parity["rows"] == len(arrays[2])
    assert parity["max_abs_diff"] <= 1e-5
    # another forest's graph is caught
    other = fit((arrays[0], 1 - arrays[1], arrays[2], 1 - arrays[3])).booster  # flipped
    with pytest.raises(StepError, match="disagrees with lightgbm"):
        gbdt.onnx_parity(onnx_bytes, output, other, arrays[2], "classification")


# --- the real steps on breast cancer ---------------------------------------------------------


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("forest")
    spec = make_spec("builtin://breast-cancer", "label", model=TREES)
    prepared, model = trained(root, spec)
    return root, prepared, model


def test_forest_reaches_a_sane_score_through_the_runtime(forest: tuple[Path, Path, Path]) -> None:
    _, prepared_dir, model_dir = forest
    prepared = load_prepared(prepared_dir)
    assert {ONNX_FILE, TRANSFORM_PROGRAM_FILE, gbdt.BOOSTER_FILE} <= {
        p.name for p in model_dir.iterdir()
    }
    model = load_model(model_dir)
    assert isinstance(model, OnnxModel)
    rows = prepared.serving_rows("test")
    served = model.predict(rows)  # raw rows in: the runtime applies the fitted transforms
    booster = gbdt.load_booster(model_dir)
    np.testing.assert_allclose(
        served, gbdt.predict_booster(booster, prepared.x_test, "classification"), atol=1e-5
    )
    metrics = compute_metrics("classification", prepared.y_test, served, classes=model.classes)
    assert metrics["roc_auc"] > 0.97
    assert metrics["accuracy"] > 0.9
    one = model.predict(rows[:1])
    assert one.shape == (1, 2)
    assert abs(float(one.sum()) - 1) < 1e-5
    meta = json.loads((model_dir / METADATA_FILE).read_text())
    assert meta["format"] == "onnx"
    assert meta["precision"]["bf16"]["allowed"] is False


def test_unknown_or_missing_format_is_refused(
    forest: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    meta = json.loads((forest[2] / METADATA_FILE).read_text())
    for value, shown in (("pickle", "format='pickle'"), (None, "format=None")):
        (tmp_path / METADATA_FILE).write_text(json.dumps({**meta, "format": value}))
        with pytest.raises(ArtifactError, match=shown):
            load_model(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"format='onnx' but .*model\.onnx"):
        load_model(tmp_path)


def test_explain_optimize_and_register_treat_the_forest(
    forest: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from kubeloop_pipelines.steps import explain, optimize, register

    root, prepared_dir, model_dir = forest
    spec = make_spec(
        "builtin://breast-cancer", "label", model=TREES,
        explanation={"method": "shap", "samples": 20},
        optimization={"quantizeInt8": True, "pruning": 0.5},
    )  # fmt: skip
    run_uri = f"file://{tmp_path / 'run'}"
    optimized = tmp_path / "optimized"
    result = optimize.run(
        spec, report=StepReport("", "optimize"), run_uri=run_uri, prepared_dir=prepared_dir,
        model_dir=model_dir, optimized_dir=optimized, report_html=tmp_path / "opt.html",
    )  # fmt: skip
    assert result.outputs["chosen"] == "baseline"
    assert set(result.outputs["variants"]) == {"int8", "pruned", "bf16"}
    assert "torchao" in result.outputs["variants"]["int8"]
    assert isinstance(load_model(optimized), OnnxModel)

    explained = explain.run(
        spec, report=StepReport("", "explain"), run_uri=run_uri, prepared_dir=prepared_dir,
        model_dir=optimized, report_html=tmp_path / "explain.html",
    )  # fmt: skip
    path = json.loads((tmp_path / "run" / explain.DECISION_PATH).read_text())
    assert path["trees"]
    assert path["trees"][0]["path"][0]["direction"] in ("<=", ">")
    assert explained.outputs["top_features"]
    assert (tmp_path / "run" / "plots" / "explanation_decision_path.png").is_file()

    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"gatesPassed": True, "metrics": {"accuracy": 0.95}}))
    register.run(
        spec, report=StepReport("", "register"), run_uri="", raw_dir=root / "raw",
        model_dir=optimized, evaluation_path=evaluation, manifest_path=tmp_path / "mv.json",
    )  # fmt: skip
    manifest = json.loads((tmp_path / "mv.json").read_text())["spec"]
    assert manifest["artifact"]["format"] == "onnx"
    assert manifest["framework"] == "onnx"


# --- TreeSHAP and the decision path ----------------------------------------------------------


def test_tree_shap_sums_to_the_raw_score_and_ranks_the_decisive_feature_first() -> None:
    arrays = decisive_table()
    booster = fit(arrays).booster
    x = arrays[2][:300]
    contributions, expected, _ = tree_shap(
        booster, x, task="classification", source=range(6), n_serving=6
    )
    raw = booster.predict(x, raw_score=True)
    np.testing.assert_allclose(contributions.sum(axis=1) + expected, raw, atol=1e-6)
    transform = {
        "columns": {"source": list(range(6)), "code": [None] * 6},
        "input_features": [f"f{i}" for i in range(6)],
        "scaling": {"center": [0.0] * 6, "scale": [1.0] * 6},
    }
    explanation = explain_trees(
        booster, task="classification", features=[f"f{i}" for i in range(6)],
        classes=["0", "1"], transform=transform, rows=x, x=x, samples=10, method="shap",
    )  # fmt: skip
    assert explanation.ranking()[0][0] == "f3"
    assert explanation.importance[3] > 5 * np.delete(explanation.importance, 3).max()
    path = decision_path(booster, x[0], transform=transform)
    top = path["trees"][0]
    assert top["path"], "the most influential tree splits"
    assert top["path"][0]["feature"] == "f3"
    assert abs(top["path"][0]["threshold"] - 0.2) < 0.1  # the rule the label was made by
