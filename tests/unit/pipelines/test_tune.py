"""Hyperparameter search: every algorithm on a tiny budget, the grid, pruning, progress, the
tune step, and errors that name the spec field."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from kubeloop.api.training_run import Imbalance, ModelSpec, TrainingRunSpec, Tuning
from kubeloop_pipelines.contract import StepError, read_json
from kubeloop_pipelines.ml.models import apply_params, arch_from
from kubeloop_pipelines.ml.train import fit
from kubeloop_pipelines.ml.tune import (
    Report,
    TuneProgress,
    grid_size,
    grid_values,
    resolved_params,
    run_study,
    validate,
)
from kubeloop_pipelines.progress import StepReport
from kubeloop_pipelines.steps import tune as tune_step
from tests.unit.pipelines.conftest import (
    Arrays,
    RecordingReport,
    ingest_and_preprocess,
    make_spec,
)


def tuning(algorithm: str, space: list[dict[str, Any]], **extra: Any) -> Tuning:
    return Tuning.model_validate(
        {"algorithm": algorithm, "searchSpace": space, "objective": {"metric": "f1"}, **extra}
    )


def objective_for(data: Arrays, base: ModelSpec) -> Any:
    xtr, ytr, xva, yva = data

    def objective(params: dict[str, Any], report: Report) -> float:
        model, _ = apply_params(base, Imbalance(), params)
        arch = arch_from(model, {}, input_shape=(30,), n_outputs=2)
        result = fit(
            arch, xtr, ytr, xva, yva, task="classification", model=model, metric="f1",
            callback=lambda s: report(s.epoch, s.val_metric),
        )  # fmt: skip
        return result.val_metric

    return objective


SPACE: list[dict[str, Any]] = [
    {"name": "learningRate", "type": "float", "min": 1e-4, "max": 1e-1, "log": True, "step": 1},
    {"name": "hiddenLayers", "type": "categorical", "values": ["8", "32,16"]},
]


@pytest.mark.parametrize("algorithm", ["grid", "random", "bayesian", "hyperband", "asha"])
def test_each_algorithm_runs_and_reports_progress(algorithm: str, cancer: Arrays) -> None:
    base = ModelSpec(epochs=4, early_stopping=None, batch_size=64)
    seen: list[TuneProgress] = []
    result = run_study(
        tuning(algorithm, SPACE, maxTrials=8, seed=1),
        objective_for(cancer, base),
        task="classification",
        max_resource=base.epochs,
        progress=seen.append,
    )
    assert len(result.trials) == 8 == len(seen)
    assert [p.completed for p in seen] == list(range(1, 9))
    assert all(p.total == 8 for p in seen)
    last = seen[-1].trials_status()
    assert last["progress"] == "8/8"
    assert last["bestValue"] == pytest.approx(result.best_value)
    assert set(last["bestParams"]) == {"learningRate", "hiddenLayers"}
    assert all(isinstance(v, str) for v in last["bestParams"].values())
    assert result.best_value > 0.9  # breast cancer is easy: the best trial must be good
    values = [t.value for t in result.trials if t.value is not None]
    assert result.best_value == max(values)


def test_grid_enumerates_every_point(cancer: Arrays) -> None:
    space: list[dict[str, Any]] = [
        {"name": "learningRate", "type": "float", "min": 1e-3, "max": 1e-1, "log": True, "step": 1},
        {"name": "dropout", "type": "float", "min": 0.0, "max": 0.2, "step": 0.1},
        {"name": "batchSize", "type": "categorical", "values": ["32", "128"]},
    ]
    spec = tuning("grid", space, maxTrials=18)
    assert [grid_values(p) for p in spec.search_space] == [
        [0.001, 0.01, 0.1],
        [0.0, 0.1, 0.2],
        ["32", "128"],
    ]
    assert grid_size(spec) == 18
    result = run_study(
        spec,
        objective_for(cancer, ModelSpec(epochs=1, early_stopping=None)),
        task="classification",
        max_resource=1,
    )
    tried = {
        (t.params["learningRate"], t.params["dropout"], t.params["batchSize"])
        for t in result.trials
    }
    assert tried == set(itertools.product([0.001, 0.01, 0.1], [0.0, 0.1, 0.2], ["32", "128"]))


def test_int_grid_and_parallel_trials(cancer: Arrays) -> None:
    space: list[dict[str, Any]] = [
        {"name": "model.epochs", "type": "int", "min": 1, "max": 3, "step": 1}
    ]
    seen: list[int] = []
    result = run_study(
        tuning("grid", space, maxTrials=3, parallelTrials=2),
        objective_for(cancer, ModelSpec(early_stopping=None)),
        task="classification",
        max_resource=3,
        progress=lambda p: seen.append(p.completed),
    )
    assert sorted(t.params["model.epochs"] for t in result.trials) == [1, 2, 3]
    assert sorted(seen) == [1, 2, 3]
    assert {t.epochs for t in result.trials} == {1, 2, 3}


@pytest.mark.parametrize("algorithm", ["hyperband", "asha"])
def test_pruners_stop_weak_trials(algorithm: str, cancer: Arrays) -> None:
    space: list[dict[str, Any]] = [
        {"name": "learningRate", "type": "float", "min": 1e-6, "max": 1e-1, "log": True}
    ]
    base = ModelSpec(epochs=9, early_stopping=None, lr_schedule="none", batch_size=128)
    seen: list[TuneProgress] = []
    result = run_study(
        tuning(algorithm, space, maxTrials=12, seed=0),
        objective_for(cancer, base),
        task="classification",
        max_resource=base.epochs,
        progress=seen.append,
    )
    pruned = [t for t in result.trials if t.state == "pruned"]
    assert pruned, [t.state for t in result.trials]
    assert all(t.epochs < base.epochs for t in pruned[:1])
    assert seen[-1].pruned == len(pruned) == result.pruned
    assert seen[-1].trials_status()["pruned"] == len(pruned)


def test_a_rerun_with_the_same_seed_repeats_the_study(cancer: Arrays) -> None:
    space: list[dict[str, Any]] = [
        {"name": "learningRate", "type": "float", "min": 1e-6, "max": 1e-1, "log": True}
    ]
    base = ModelSpec(epochs=9, early_stopping=None, lr_schedule="none", batch_size=128)

    def once() -> list[tuple[str, float | None, int]]:
        result = run_study(
            tuning("hyperband", space, maxTrials=8, seed=5),
            objective_for(cancer, base),
            task="classification",
            max_resource=base.epochs,
        )
        return [(t.state, t.value, t.epochs) for t in result.trials]

    assert once() == once()


def test_resolved_params_apply_tuned_values() -> None:
    params = resolved_params(
        ModelSpec(), Imbalance(), {"hiddenLayers": "128,64", "imbalance.focalGamma": 1.5}
    )
    assert params["hiddenLayers"] == [128, 64]
    assert params["imbalance.focalGamma"] == 1.5
    assert params["learningRate"] == ModelSpec().learning_rate
    model, imbalance = apply_params(ModelSpec(), Imbalance(), params)  # round-trips
    assert model.hidden_layers == [128, 64]
    assert imbalance.focal_gamma == 1.5


@pytest.mark.parametrize(
    ("space", "extra", "task", "field"),
    [
        ([{"name": "learningRate", "type": "float", "min": 1e-4, "max": 1e-2},
          {"name": "colour", "type": "categorical", "values": ["red"]}],
         {}, "classification", "tuning.searchSpace[1].name"),
        ([{"name": "dropout", "type": "float", "min": 0.1, "max": 0.5},
          {"name": "model.dropout", "type": "float", "min": 0.1, "max": 0.5}],
         {}, "classification", "tuning.searchSpace[1].name"),
        ([{"name": "dropout", "type": "float", "min": 0.0, "max": 1.5}],
         {}, "classification", "tuning.searchSpace[0].max"),
        ([{"name": "hiddenLayers", "type": "categorical", "values": ["64,32", "wide"]}],
         {}, "classification", "tuning.searchSpace[0].values"),
        ([{"name": "dropout", "type": "float", "min": 0.0, "max": 0.5}],
         {"algorithm": "grid"}, "classification", "tuning.searchSpace[0].step"),
        ([{"name": "dropout", "type": "float", "min": 0.0, "max": 0.5, "step": 0.01}],
         {"algorithm": "grid", "maxTrials": 20}, "classification", "tuning.searchSpace"),
        ([{"name": "dropout", "type": "float", "min": 0.0, "max": 0.5}],
         {}, "regression", "tuning.objective.metric"),
        ([{"name": "dropout", "type": "float", "min": 0.0, "max": 0.5}],
         {"objective": {"metric": "rmse", "direction": "maximize"}}, "regression",
         "tuning.objective.direction"),
        ([{"name": "dropout", "type": "float", "min": 0.0, "max": 0.5}],
         {"objective": {"metric": "latency_ms", "direction": "minimize"}}, "classification",
         "tuning.objective.metric"),
    ],
)  # fmt: skip
def test_invalid_tuning_names_the_field(
    space: list[dict[str, Any]], extra: dict[str, Any], task: str, field: str
) -> None:
    spec = Tuning.model_validate({"searchSpace": space, **extra})
    with pytest.raises(StepError) as caught:
        validate(spec, task)
    assert caught.value.field == field
    assert field in caught.value.message  # the message names the field and the value


def test_grid_too_large_says_how_big() -> None:
    spec = Tuning.model_validate(
        {
            "algorithm": "grid",
            "maxTrials": 10,
            "searchSpace": [
                {"name": "dropout", "type": "float", "min": 0.0, "max": 0.4, "step": 0.1},
                {"name": "batchSize", "type": "categorical", "values": ["32", "64", "128"]},
            ],
        }
    )
    with pytest.raises(StepError, match=r"grid of 15 points \(5 x 3\).*maxTrials=10"):
        validate(spec, "classification")


def test_failing_trials_do_not_stop_the_study(cancer: Arrays) -> None:
    # A trial the objective rejects (StepError) fails; the others go on.
    calls: list[dict[str, Any]] = []

    def objective(params: dict[str, Any], report: Report) -> float:
        calls.append(params)
        if params["dropout"] > 0.25:
            raise StepError("dropout too high for this test", field="model.dropout")
        return 1.0 - float(params["dropout"])

    space = [{"name": "dropout", "type": "float", "min": 0.0, "max": 0.5, "step": 0.5}]
    result = run_study(
        tuning("grid", space, maxTrials=2), objective, task="classification", max_resource=1
    )
    assert result.failed == 1
    assert result.best_params == {"dropout": 0.0}
    assert "dropout too high" in next(t.error for t in result.trials if t.state == "failed")

    space = [{"name": "dropout", "type": "float", "min": 0.3, "max": 0.5, "step": 0.2}]
    with pytest.raises(StepError, match="no tuning trial completed") as caught:
        run_study(tuning("grid", space, maxTrials=2), objective, task="classification",
                  max_resource=1)  # fmt: skip
    assert caught.value.field == "model.dropout"


def spec_json(tuning_doc: dict[str, Any] | None, **model: Any) -> TrainingRunSpec:
    tuning = {} if tuning_doc is None else {"tuning": tuning_doc}
    return make_spec(
        "builtin://breast-cancer", "label",
        model={"epochs": 3, "earlyStopping": None, **model}, **tuning,
    )  # fmt: skip


def test_tune_step_without_tuning_writes_the_spec_params(tmp_path: Path) -> None:
    spec = spec_json(None, learningRate=0.01)
    result = tune_step.run(
        spec,
        report=StepReport("", "tune"),
        run_uri="",
        prepared_dir=tmp_path / "prepared",
        params_path=tmp_path / "params.json",
        report_html=tmp_path / "tuning.html",
    )
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["learningRate"] == 0.01
    assert params["epochs"] == 3
    assert result.outputs == {"tuned": False}


def test_tune_step_reports_every_trial_and_writes_the_best_params(tmp_path: Path) -> None:
    space = [
        {"name": "learningRate", "type": "float", "min": 1e-4, "max": 1e-1, "log": True},
        {"name": "hiddenLayers", "type": "categorical", "values": ["16", "64,32"]},
    ]
    spec = spec_json(
        {"algorithm": "bayesian", "maxTrials": 4, "seed": 3, "searchSpace": space,
         "objective": {"metric": "roc_auc"}},
    )  # fmt: skip
    ingest_and_preprocess(tmp_path, spec)
    run_dir = tmp_path / "run"
    report = RecordingReport(f"file://{run_dir}", "tune")
    result = tune_step.run(
        spec, report=report, run_uri=f"file://{run_dir}", prepared_dir=tmp_path / "prepared",
        params_path=tmp_path / "params.json", report_html=tmp_path / "tuning.html",
    )  # fmt: skip

    trials = [u["trials"] for u in report.updates if "trials" in u]
    assert [t["completed"] for t in trials] == [0, 1, 2, 3, 4]
    assert all(t["total"] == 4 for t in trials)
    assert report.updates[-1]["message"].startswith("trial 4/4")
    final = read_json(run_dir / "steps" / "tune.json")["trials"]
    assert final["progress"] == "4/4"
    assert final["bestValue"] == pytest.approx(result.metrics["best_value"])
    assert set(final["bestParams"]) == {"learningRate", "hiddenLayers"}
    assert result.metrics["trials_completed"] == 4
    assert result.metrics["trials_pruned"] == 0
    assert result.metrics["best_value"] > 0.95

    params = json.loads((tmp_path / "params.json").read_text())
    best = result.outputs["best_params"]
    assert params["learningRate"] == pytest.approx(float(best["learningRate"]), rel=1e-3)
    assert params["hiddenLayers"] == [int(w) for w in best["hiddenLayers"].split(",")]
    assert params["epochs"] == 3  # untuned values come from the spec
    page = (run_dir / "reports" / "tuning.html").read_text()
    assert "data:image/png;base64" in page
    assert page.count("<tr>") == 1 + 4  # header + one row a trial
    assert result.published == {"tuning_report": "reports/tuning.html"}


def test_tune_step_rejects_a_regression_objective_on_classes(tmp_path: Path) -> None:
    spec = spec_json(
        {"searchSpace": [{"name": "dropout", "type": "float", "min": 0.0, "max": 0.5}],
         "objective": {"metric": "rmse", "direction": "minimize"}},
    )  # fmt: skip
    ingest_and_preprocess(tmp_path, spec)
    with pytest.raises(StepError) as caught:
        tune_step.run(
            spec, report=StepReport("", "tune"), run_uri="", prepared_dir=tmp_path / "prepared",
            params_path=tmp_path / "params.json", report_html=tmp_path / "tuning.html",
        )  # fmt: skip
    assert caught.value.field == "tuning.objective.metric"
    assert "'rmse'" in caught.value.message
    assert "f1" in caught.value.message
