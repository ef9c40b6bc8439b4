"""End to end: breast cancer on the local executor with LIME, partial dependence and
counterfactuals; the explain step writes ``reports/report.html`` into the run directory and
the registered manifest links it (``spec.lineage.reportUri``). No cluster is needed."""

from __future__ import annotations

import json
from pathlib import Path

from kubeloop.api.model_version import ModelVersionSpec
from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.contract.steps import MANIFEST_FILE
from kubeloop_pipelines.compiler import compile_spec
from kubeloop_pipelines.ml.report import REPORT_FILE
from tests.integration.test_executors import finished, submission

SPEC = TrainingRunSpec.model_validate(
    {
        "data": {"uri": "builtin://breast-cancer", "target": "label"},
        "model": {"epochs": 3, "hiddenLayers": [16]},
        "explanation": {"method": "permutation", "samples": 20, "lime": True,
                        "partialDependence": True, "counterfactuals": True, "localRows": 2},
        "resources": {"cpu": "1", "memory": "1Gi"},
        "registration": {"modelName": "cancer"},
        "retries": 0,
    }
)  # fmt: skip


async def test_the_registered_manifest_links_the_report(
    local: LocalExecutor, tmp_path: Path
) -> None:
    compiled = compile_spec(SPEC)
    assert "explain" in compiled.steps
    run_dir = tmp_path / "artifacts" / "team-a" / "cancer" / "attempt-1"
    sub = submission(compiled.ir_yaml, run_uri=f"file://{run_dir}", timeout_s=600)
    seen = await finished(local, sub, await local.submit(sub), within=600)
    assert seen.state == "Succeeded", f"{seen.message}\n{seen.log_tail}"

    page = (run_dir / REPORT_FILE).read_text()
    for heading in ("Confusion matrix", "Partial dependence and ICE", "Local explanations (LIME)",
                    "Counterfactuals"):  # fmt: skip
        assert f"<h2>{heading}</h2>" in page, heading
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    link = manifest["spec"]["lineage"]["reportUri"]
    assert link == f"file://{run_dir}/{REPORT_FILE}"
    ModelVersionSpec.model_validate({**manifest["spec"], "modelName": "cancer", "version": 1})
