"""The CMA-ES and Gaussian-process samplers (``tuning.algorithm`` cmaes and gp): the study
uses them, a seed reproduces the trials, each beats random search on a small deterministic
objective with the same budget, and cmaes with only categorical parameters is refused."""

from __future__ import annotations

import logging
import statistics
from typing import Any

import optuna
import pytest
from pydantic import ValidationError

from kubeloop.api.crdgen import crd_for
from kubeloop.api.training_run import TrainingRun, Tuning
from kubeloop_pipelines.contract import StepError
from kubeloop_pipelines.ml.tune import Report, TuneResult, make_sampler, run_study, validate

# Two numeric dimensions with the optimum inside, off every grid: (0.62, 0.23).
NUMERIC: list[dict[str, Any]] = [
    {"name": "dropout", "type": "float", "min": 0.0, "max": 0.9},
    {"name": "weightDecay", "type": "float", "min": 0.0, "max": 1.0},
]
OPTIMIZER = {"name": "optimizer", "type": "categorical", "values": ["adam", "adamw", "sgd"]}


def tuning(algorithm: str, trials: int, seed: int = 0, space: Any = None) -> Tuning:
    return Tuning.model_validate(
        {
            "algorithm": algorithm,
            "maxTrials": trials,
            "seed": seed,
            "searchSpace": NUMERIC if space is None else space,
            "objective": {"metric": "mse", "direction": "minimize"},
        }
    )


def bowl(params: dict[str, Any], report: Report) -> float:
    """A deterministic objective to minimise: squared distance to (0.62, 0.23), plus 0.05
    unless the optimiser (when searched) is adamw."""
    penalty = 0.0 if params.get("optimizer", "adamw") == "adamw" else 0.05
    dropout, weight_decay = float(params["dropout"]), float(params["weightDecay"])
    return (dropout - 0.62) ** 2 + (weight_decay - 0.23) ** 2 + penalty


def study(algorithm: str, trials: int, seed: int = 0, space: Any = None) -> TuneResult:
    return run_study(
        tuning(algorithm, trials, seed, space), bowl, task="regression", max_resource=1
    )


@pytest.mark.parametrize(
    ("algorithm", "sampler"),
    [("cmaes", optuna.samplers.CmaEsSampler), ("gp", optuna.samplers.GPSampler)],
)
def test_the_study_uses_the_named_sampler(algorithm: str, sampler: type[Any]) -> None:
    assert isinstance(make_sampler(tuning(algorithm, 4)), sampler)
    result = study(algorithm, 3)
    assert result.sampler == sampler.__name__
    assert (result.algorithm, len(result.trials), result.completed) == (algorithm, 3, 3)


@pytest.mark.parametrize(("algorithm", "trials"), [("cmaes", 12), ("gp", 5)])
def test_a_seed_reproduces_the_trials(algorithm: str, trials: int) -> None:
    space = [*NUMERIC, OPTIMIZER]  # cmaes: the categorical one goes through its TPE

    def proposed(seed: int) -> list[dict[str, Any]]:
        return [t.params for t in study(algorithm, trials, seed, space).trials]

    first = proposed(seed=3)
    assert proposed(seed=3) == first
    assert proposed(seed=4) != first
    assert {p["optimizer"] for p in first} <= {"adam", "adamw", "sgd"}


def test_cmaes_beats_random_search_with_the_same_budget() -> None:
    cmaes = [study("cmaes", 60, seed).best_value for seed in range(5)]
    random = [study("random", 60, seed).best_value for seed in range(5)]
    print(f"best of 60: cmaes {cmaes}, random {random}")
    assert statistics.median(cmaes) < statistics.median(random) / 2


def test_gp_beats_random_search_with_the_same_budget() -> None:
    gp = [study("gp", 10, seed).best_value for seed in range(2)]
    random = [study("random", 10, seed).best_value for seed in range(5)]
    print(f"best of 10: gp {gp}, random {random}")
    assert max(gp) < statistics.median(random) / 10


def test_cmaes_warns_once_that_categorical_parameters_are_sampled_by_tpe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        result = study("cmaes", 8, space=[*NUMERIC, OPTIMIZER])
    ours = [r for r in caplog.records if "CMA-ES models only the numeric" in r.getMessage()]
    assert len(ours) == 1
    assert "optimizer is sampled independently by a seeded TPE" in ours[0].getMessage()
    assert not [r for r in caplog.records if "independent" in r.getMessage() and r not in ours]
    assert result.completed == 8


def test_cmaes_with_only_categorical_parameters_is_refused() -> None:
    only_categorical = [OPTIMIZER, {"name": "hiddenLayers", "type": "categorical",
                                    "values": ["16", "64"]}]  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        tuning("cmaes", 4, space=only_categorical)
    message = str(caught.value)
    assert "searchSpace (optimizer, hiddenLayers)" in message
    assert "at least one" in message
    assert "int and float" in message
    tuning("random", 4, space=only_categorical)  # other algorithms take them
    tuning("gp", 4, space=only_categorical)

    # the step refuses it too (a spec that bypassed the model), naming the field
    bypassed = tuning("random", 4, space=only_categorical).model_copy(update={"algorithm": "cmaes"})
    with pytest.raises(StepError) as refused:
        validate(bypassed, "regression")
    assert refused.value.field == "tuning.searchSpace"
    assert "cmaes" in refused.value.message

    # and the API server at apply: the CRD carries the rule on spec.tuning
    schema = crd_for(TrainingRun)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    node = schema["properties"]["spec"]["properties"]["tuning"]
    (rule,) = [r for r in node["x-kubernetes-validations"] if "cmaes" in r["rule"]]
    assert rule["rule"] == (
        "self.algorithm != 'cmaes' || self.searchSpace.exists(p, p.type != 'categorical')"
    )
    assert rule["fieldPath"] == ".searchSpace"
    assert "at least one" in rule["message"]
    assert {"cmaes", "gp"} <= set(node["properties"]["algorithm"]["enum"])
