"""The ranking and fit-gate fields of a TrainingRun: what the model accepts and refuses, the
planner's check before any pipeline runs, and the generated CRD carrying the same rules (the
API server's refusals are in tests/integration/test_validation.py, BOUNDS)."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
import yaml

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.planning.training_run import spec_problem
from tests.conftest import ROOT

RANKED: dict[str, Any] = {
    "data": {
        "uri": "builtin://ranking",
        "target": "relevance",
        "task": "regression",
        "groupColumn": "query_id",
    },
    "registration": {"modelName": "search"},
}


def spec(**evaluation: Any) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate(RANKED | {"evaluation": evaluation})


def test_ranking_gates_fit_gate_and_defaults() -> None:
    parsed = spec(gates=[{"metric": "ndcg_at_k", "value": 0.7}], fitGate={})
    assert parsed.data.group_column == "query_id"
    assert parsed.evaluation.ranking is None  # k defaults to 10 in the evaluate step
    assert parsed.evaluation.fit_gate is not None
    assert parsed.evaluation.fit_gate.reject == ["overfit"]
    assert spec(ranking={"k": 3}).evaluation.ranking is not None
    assert spec_problem(parsed) == ""


@pytest.mark.parametrize(
    ("data", "evaluation", "message"),
    [
        ({"groupColumn": None}, {"gates": [{"metric": "ndcg_at_k", "value": 0.5}]},
         "evaluation.gates[0].metric=ndcg_at_k ranks rows within groups"),
        ({"groupColumn": None}, {"ranking": {"k": 5}}, "evaluation.ranking needs data.groupColumn"),
        ({"groupColumn": "relevance"}, {}, "groupColumn='relevance' is the target"),
        ({"features": ["text_match", "query_id"]}, {}, "leave it out of features"),
        ({}, {"gates": [{"metric": "map_at_k", "value": 1.2}]}, "map_at_k is a fraction"),
        ({}, {"fitGate": {"reject": ["underfit", "underfit"]}}, "repeats a verdict"),
        ({}, {"fitGate": {}, "learningCurves": False}, "it needs learningCurves: true"),
    ],
)  # fmt: skip
def test_bad_ranking_and_fit_gate_specs_name_the_field(
    data: dict[str, Any], evaluation: dict[str, Any], message: str
) -> None:
    doc = RANKED | {"data": RANKED["data"] | data, "evaluation": evaluation}
    with pytest.raises(pydantic.ValidationError) as info:
        TrainingRunSpec.model_validate(doc)
    assert message in str(info.value)


def test_tuning_on_a_ranking_metric_is_refused_before_the_pipeline() -> None:
    tuned = TrainingRunSpec.model_validate(
        RANKED
        | {
            "tuning": {
                "objective": {"metric": "ndcg_at_k"},
                "searchSpace": [{"name": "learningRate", "type": "float", "min": 1e-4, "max": 1}],
            }
        }
    )
    problem = spec_problem(tuned)
    assert problem.startswith("spec.tuning.objective.metric='ndcg_at_k' is a test-split ranking")
    assert "rmse" in problem  # what it can tune on instead


def test_crd_carries_the_ranking_and_fit_gate_rules() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "kubeloop.dev_trainingruns.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    data = schema["properties"]["data"]
    assert "groupColumn" in data["properties"]
    assert "description" in data["properties"]["groupColumn"]
    evaluation = schema["properties"]["evaluation"]["properties"]
    assert evaluation["fitGate"]["properties"]["reject"]["items"]["enum"] == [
        "overfit",
        "underfit",
    ]
    assert evaluation["ranking"]["properties"]["k"]["maximum"] == 1000
    rules = [v["rule"] for v in schema["x-kubernetes-validations"]]
    assert any("groupColumn" in r and "ndcg_at_k" in r for r in rules)
    gate = evaluation["gates"]["items"]["properties"]["metric"]["enum"]
    assert {"map_at_k", "ndcg_at_k"} <= set(gate)
