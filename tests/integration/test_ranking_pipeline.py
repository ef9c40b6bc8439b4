"""A ranking TrainingRun end to end through the local executor (kfp.local running the compiled
IR in a detached runner, as tests/integration/test_executors.py does for breast cancer): the
built-in ranking data grouped by ``query_id``, a gate on ndcg_at_k that passes and registers;
and an over-fitting spec that the fit gate refuses, which the planner then reports as
``GatesPassed=False`` with the verdict's explanation. No cluster is needed.

(No ``from __future__ import annotations``: KFP may read annotations in this process.)
"""

import asyncio
import json
from pathlib import Path
from typing import Any

from kubeloop import reasons
from kubeloop.api.training_run import TrainingRunSpec, TrainingRunStatus
from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.contract.steps import EVALUATION_FILE, MANIFEST_FILE
from kubeloop.planning.conditions import find
from kubeloop.planning.training_run import RunView, plan_training
from kubeloop_pipelines.compiler import compile_spec
from tests.integration.test_executors import finished, submission
from tests.unit.test_planning_training_run import obs

RANKING_DATA: dict[str, Any] = {
    "uri": "builtin://ranking",
    "target": "relevance",
    "task": "regression",
    "groupColumn": "query_id",
}
COMMON: dict[str, Any] = {
    "explanation": {"method": "none"},
    "resources": {"cpu": "1", "memory": "1Gi"},
    "registration": {"modelName": "search"},
    "retries": 0,
}
RANKING = TrainingRunSpec.model_validate(
    COMMON
    | {
        "data": RANKING_DATA,
        "model": {"epochs": 6, "hiddenLayers": [16], "batchSize": 32},
        "evaluation": {"gates": [{"metric": "ndcg_at_k", "value": 0.8}], "ranking": {"k": 5}},
    }
)
# Memorises noise: the uninformative columns only, a wide net without dropout, batch norm,
# weight decay or early stopping, on 15% of the rows. The validation loss rises well past its
# epoch-1 minimum while the training loss falls (seeded: +25% on this machine).
OVERFITTING = TrainingRunSpec.model_validate(
    COMMON
    | {
        "data": RANKING_DATA
        | {
            "features": ["popularity", "doc_length", "freshness"],
            "split": {"validation": 0.4, "test": 0.45},
        },
        "model": {
            "epochs": 60, "hiddenLayers": [256, 256], "dropout": 0, "batchNorm": False,
            "earlyStopping": None, "learningRate": 0.01, "batchSize": 8, "lrSchedule": "none",
        },
        "evaluation": {
            "gates": [{"metric": "ndcg_at_k", "value": 0.1}],
            "fitGate": {"reject": ["overfit"]},
        },
    }
)  # fmt: skip


async def run_locally(
    local: LocalExecutor, spec: TrainingRunSpec, run_dir: Path, name: str
) -> dict[str, dict[str, Any]]:
    """Compile and run ``spec``; the step records by step name once it succeeded."""
    sub = submission(
        compile_spec(spec).ir_yaml, name=name, run_uri=f"file://{run_dir}", timeout_s=600
    )
    seen = await finished(local, sub, await local.submit(sub), within=600)
    assert seen.state == "Succeeded", f"{seen.message}\n{seen.log_tail}"
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "steps").glob("*.json")}


async def test_ranking_run_gates_on_ndcg_and_the_fit_gate_refuses_overfitting(
    local: LocalExecutor, tmp_path: Path
) -> None:
    ranked_dir, overfit_dir = tmp_path / "ranked", tmp_path / "overfit"
    ranked, overfit = await asyncio.gather(
        run_locally(local, RANKING, ranked_dir, "search"),
        run_locally(local, OVERFITTING, overfit_dir, "overfit"),
    )

    # the ranking run: ranked within query groups, gated on ndcg, registered
    assert ranked["evaluate"]["outputs"]["gates_passed"] is True
    evaluation = json.loads((ranked_dir / EVALUATION_FILE).read_text())
    assert evaluation["metrics"]["ndcg_at_k"] >= 0.8, evaluation["metrics"]
    assert 0 < evaluation["metrics"]["map_at_k"] <= 1
    assert evaluation["ranking"]["k"] == 5
    assert evaluation["gateSummary"].startswith("ndcg_at_k=")
    assert (ranked_dir / MANIFEST_FILE).is_file()
    manifest = json.loads((ranked_dir / MANIFEST_FILE).read_text())
    assert "query_id" not in json.dumps(manifest.get("spec", {}).get("signature", {}))

    # the over-fitted run: its ndcg gate alone would pass, the fit gate refuses it
    assert overfit["evaluate"]["outputs"]["gates_passed"] is False
    assert "register" not in overfit or overfit["register"].get("state") != "Succeeded"
    assert not (overfit_dir / MANIFEST_FILE).exists()
    refused = json.loads((overfit_dir / EVALUATION_FILE).read_text())
    assert refused["verdict"]["verdict"] == "overfit"
    assert [g["passed"] for g in refused["gates"]] == [True, False]
    assert "fit=overfit ✗ (fitGate rejects overfit: " in refused["gateSummary"]

    # what the operator makes of it: GatesPassed=False naming the verdict, nothing registered
    first = plan_training(OVERFITTING, TrainingRunStatus(), obs()).status
    first.run_id = "local-1"
    decision = plan_training(OVERFITTING, first, obs(run=RunView("Succeeded"), evaluation=refused))
    assert not decision.register
    gates = find(decision.status.conditions, "GatesPassed")
    assert gates is not None
    assert (gates.status, gates.reason) == ("False", reasons.GATES_FAILED)
    assert refused["verdict"]["explanation"][:60] in gates.message
