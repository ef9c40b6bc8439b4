"""End to end: a TrainingRun with ``model.family: lightgbm`` compiled to KFP IR, run by the
local executor (``kfp.local`` in a detached runner process, the very IR a cluster would get),
registered with an ``onnx`` artifact, and that artifact served by the runtime's Predictor.
Mirrors ``tests/integration/test_executors.py::test_local_trains_breast_cancer_end_to_end``
(no API server needed), with a small forest."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.backends.executor import RunObservation, Submission
from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.contract.steps import MANIFEST_FILE, MODEL_DIR
from kubeloop.serving.onnx_model import OnnxModel
from kubeloop.serving.predictor import Predictor, ServingOptions
from kubeloop.serving.samples import breast_cancer_rows
from kubeloop_pipelines.compiler import compile_spec

SPEC = TrainingRunSpec.model_validate(
    {
        "data": {"uri": "builtin://breast-cancer", "target": "label"},
        "model": {"family": "lightgbm", "trees": {"nEstimators": 60, "numLeaves": 7}},
        "imbalance": {"strategy": "class_weights"},
        "evaluation": {"gates": [{"metric": "roc_auc", "op": ">=", "value": 0.95}]},
        "explanation": {"method": "shap", "samples": 10},
        "optimization": {"quantizeInt8": True},
        "resources": {"cpu": "1", "memory": "1Gi"},
        "registration": {"modelName": "cancer-trees"},
        "retries": 0,
    }
)


async def finished(executor: LocalExecutor, sub: Submission, run_id: str) -> RunObservation:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        seen = await executor.observe(sub.namespace, sub.name, sub.attempt, run_id)
        if seen.state in ("Succeeded", "Failed", "Unknown"):
            return seen
        await asyncio.sleep(1)
    raise AssertionError(f"run {run_id} did not finish within 600 s")


async def test_lightgbm_trains_registers_and_serves_through_the_pipeline(
    local: LocalExecutor, tmp_path: Path
) -> None:
    compiled = compile_spec(SPEC)
    assert compiled.steps == (
        "ingest", "preprocess", "train", "optimize", "evaluate", "explain", "register"
    )  # fmt: skip
    run_dir = tmp_path / "artifacts" / "team-a" / "trees" / "attempt-1"
    uri = f"file://{run_dir}"
    sub = Submission(
        namespace="team-a", name="trees", attempt=1, ir_yaml=compiled.ir_yaml,
        spec_hash=hashlib.sha256(compiled.ir_yaml.encode()).hexdigest(), run_uri=uri,
        arguments={"run_uri": uri}, timeout_s=600,
    )  # fmt: skip
    seen = await finished(local, sub, await local.submit(sub))
    assert seen.state == "Succeeded", f"{seen.message}\n{seen.log_tail}"
    records = {p.stem: json.loads(p.read_text()) for p in (run_dir / "steps").glob("*.json")}
    assert all(r["state"] == "Succeeded" for r in records.values()), records
    assert records["evaluate"]["outputs"]["gates_passed"] is True
    assert "torchao" in records["optimize"]["outputs"]["variants"]["int8"]

    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())["spec"]
    assert manifest["artifact"]["format"] == "onnx"
    assert (run_dir / "reports" / "decision-path.json").is_file()

    predictor = Predictor.load("trees", "v1", run_dir / MODEL_DIR, ServingOptions())
    assert isinstance(predictor.model, OnnxModel)
    rows = np.asarray(breast_cancer_rows(4), dtype=np.float32)
    out = await predictor.predict(rows, request_id="r-1")
    assert np.asarray(out).shape == (4, 2)
    await predictor.close()
