"""End to end: a text TrainingRun with a bidirectional LSTM tuned by CMA-ES, compiled to KFP IR
and run by the local executor (``kfp.local`` in a detached runner process), registered, and its
artifact loaded by the serving runtime. The modules themselves: tests/unit/test_rnn.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.contract.steps import MANIFEST_FILE
from kubeloop.serving.artifact import load_model
from kubeloop_pipelines.compiler import compile_spec
from tests.integration.test_executors import finished, submission

# --- the compiled pipeline on the local runner -----------------------------------------------

E2E_SPEC = TrainingRunSpec.model_validate(
    {
        "data": {"uri": "builtin://reviews", "target": "sentiment"},
        "model": {
            "family": "lstm", "bidirectional": True, "embeddingDim": 16, "hiddenSize": 16,
            "layers": 1, "epochs": 2, "batchSize": 64, "earlyStopping": None,
        },
        "tuning": {
            "algorithm": "cmaes",
            "maxTrials": 3,
            "objective": {"metric": "f1", "direction": "maximize"},
            "searchSpace": [
                {"name": "learningRate", "type": "float", "min": 0.003, "max": 0.03, "log": True},
                {"name": "hiddenSize", "type": "int", "min": 8, "max": 24},
            ],
        },
        "explanation": {"method": "none"},
        "resources": {"cpu": "1", "memory": "1Gi"},
        "registration": {"modelName": "reviews"},
        "retries": 0,
    }
)  # fmt: skip


async def test_bidirectional_lstm_tuned_by_cmaes_runs_the_local_pipeline(
    local: LocalExecutor, tmp_path: Path
) -> None:
    compiled = compile_spec(E2E_SPEC)
    assert compiled.steps == ("ingest", "preprocess", "tune", "train", "evaluate", "register")
    run_dir = tmp_path / "artifacts" / "team-a" / "reviews" / "attempt-1"
    sub = submission(compiled.ir_yaml, name="reviews", run_uri=f"file://{run_dir}", timeout_s=900)
    seen = await finished(local, sub, await local.submit(sub), within=900)
    assert seen.state == "Succeeded", f"{seen.message}\n{seen.log_tail}"
    records = {p.stem: json.loads(p.read_text()) for p in (run_dir / "steps").glob("*.json")}
    assert all(r["state"] == "Succeeded" for r in records.values()), records
    assert records["tune"]["trials"]["completed"] == 3
    assert set(records["tune"]["trials"]["bestParams"]) == {"learningRate", "hiddenSize"}
    assert (run_dir / MANIFEST_FILE).is_file()  # registered

    served = load_model(run_dir / "model")
    assert served.modality == "text"
    probs = served.predict(np.zeros((5, served.n_features), dtype=np.float32))
    assert probs.shape == (5, 2)
    arch = json.loads((run_dir / "model" / "arch.json").read_text())
    assert (arch["family"], arch["bidirectional"]) == ("lstm", True)
    best_hidden = int(records["tune"]["trials"]["bestParams"]["hiddenSize"])
    assert arch["hidden_size"] == best_hidden
