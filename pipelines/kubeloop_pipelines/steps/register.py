"""register: publish the final model and write the ModelVersion manifest.

The step does not talk to the Kubernetes API: it writes ``modelversion.json`` (the spec of the
ModelVersion to create) into the run directory and as its KFP output, and the operator creates
the ModelVersion from it. Pipeline pods therefore need no RBAC on kubeloop's resources, and the
operator re-checks the gates and picks the version number (the next free one of the model) in
one place. The compiler only schedules this step when every gate passed.

The manifest carries what drift detection and safe rollouts need later: the artifact URI and
digest, the test metrics, the input signature (serving features in order), the lineage
(dataset URI and digest), the training reference distribution of every feature and that of the
prediction score (``kubeloop.contract.reference.manifest_reference``), and the link to the
run's explanation and evaluation report (``lineage.reportUri``, when the explain step wrote
one: ``ml/report.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kubeloop.api.model_version import ModelVersionSpec
from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.artifact import FORMAT, METADATA_FILE, REGISTRY_FORMATS, digest
from kubeloop.contract.reference import manifest_reference
from kubeloop.contract.steps import MANIFEST_FILE, MODEL_DIR
from kubeloop_pipelines.contract import (
    SCHEMA_FILE,
    StepError,
    StepResult,
    read_json,
    write_json,
)
from kubeloop_pipelines.ml.report import REPORT_FILE
from kubeloop_pipelines.progress import StepReport, local_path, publish, write_text

METRIC_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def _metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """Test metrics whose names the registry accepts (lower snake case, finite)."""
    out: dict[str, float] = {}
    for name, value in (evaluation.get("metrics") or {}).items():
        key = str(name).lower()
        if not key or not key[0].isalpha() or set(key) - METRIC_NAME_CHARS or len(key) > 63:
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return dict(list(out.items())[:64])


def build_manifest(
    spec: TrainingRunSpec,
    *,
    artifact_uri: str,
    sha256: str | None,
    size_bytes: int | None,
    model_json: dict[str, Any],
    schema: dict[str, Any],
    evaluation: dict[str, Any],
    report_uri: str | None = None,
) -> dict[str, Any]:
    """The ModelVersion spec, without ``modelName``/``version`` (the operator sets them)."""
    task = str(model_json.get("task", spec.data.task))
    features = [str(f) for f in model_json.get("features") or []]
    classes = [str(c) for c in model_json.get("classes") or []]
    outputs = (
        [{"name": "probabilities", "dtype": "float32", "shape": [len(classes)]}]
        if task == "classification"
        else [{"name": "prediction", "dtype": "float32", "shape": []}]
    )
    # model.json's format (torch-export, onnx) as the registry names it (torch, onnx)
    fmt = str(model_json.get("format") or FORMAT)
    if fmt not in REGISTRY_FORMATS:
        raise StepError(
            f"{METADATA_FILE} has format={fmt!r}; expected one of {list(REGISTRY_FORMATS)}"
        )
    registry_format = REGISTRY_FORMATS[fmt]
    artifact: dict[str, Any] = {"uri": artifact_uri, "format": registry_format}
    if sha256:
        artifact["sha256"] = sha256
    if size_bytes is not None:
        artifact["sizeBytes"] = size_bytes
    lineage = {
        "datasetUri": str(schema.get("source") or spec.data.uri)[:1024],
        "datasetSha256": str(schema.get("sha256") or "")[:64] or None,
        "reportUri": report_uri,
    }
    manifest_spec: dict[str, Any] = {
        "artifact": artifact,
        "task": task,
        "framework": registry_format,
        "metrics": _metrics(evaluation),
        "signature": {
            "inputs": [{"name": f[:128], "dtype": "float32", "shape": []} for f in features],
            "outputs": outputs,
        },
        "lineage": {k: v for k, v in lineage.items() if v},
        **manifest_reference(model_json.get("reference") or {}),
        "aliases": [spec.registration.alias] if spec.registration.alias else [],
        "description": f"{spec.model.family} trained on {spec.data.uri}"[:4096],
    }
    # Validate here, where the step's log explains a failure, not only in the operator.
    ModelVersionSpec.model_validate({**manifest_spec, "modelName": "check", "version": 1})
    return {"apiVersion": "kubeloop.dev/v1alpha1", "kind": "ModelVersion", "spec": manifest_spec}


def report_uri(spec: TrainingRunSpec, run_uri: str) -> str | None:
    """The run's report (``reports/report.html``) when the explain step wrote one: the compiler
    runs this step after explain, so on an object store its being scheduled is enough."""
    if not run_uri or spec.explanation.method == "none":
        return None
    path = local_path(run_uri)
    if path is not None and not (path / REPORT_FILE).is_file():
        return None
    return f"{run_uri.rstrip('/')}/{REPORT_FILE}"


def run(
    spec: TrainingRunSpec,
    *,
    report: StepReport,
    run_uri: str,
    raw_dir: Path,
    model_dir: Path,
    evaluation_path: Path,
    manifest_path: Path,
) -> StepResult:
    evaluation = read_json(evaluation_path)
    if not evaluation.get("gatesPassed", False):
        # The compiler only runs this step after the gates passed; refuse all the same.
        raise StepError("the evaluation gates did not pass: nothing is registered")
    model_json_path = model_dir / METADATA_FILE
    if not model_json_path.is_file():
        raise StepError(
            f"{model_dir} holds no {METADATA_FILE}: the model was not saved", permanent=False
        )
    model_json = json.loads(model_json_path.read_text())
    schema = read_json(raw_dir / SCHEMA_FILE) if (raw_dir / SCHEMA_FILE).is_file() else {}

    report.update(message="publishing the model", force=True)
    if run_uri:
        artifact_uri = publish(run_uri, MODEL_DIR, model_dir)
        published = local_path(run_uri)
        files = published / MODEL_DIR if published is not None else model_dir
    else:
        artifact_uri, files = f"file://{model_dir.resolve()}", model_dir
    size = sum(p.stat().st_size for p in files.rglob("*") if p.is_file())
    manifest = build_manifest(
        spec,
        artifact_uri=artifact_uri,
        sha256=digest(files),
        size_bytes=size,
        model_json=model_json,
        schema=schema,
        evaluation=evaluation,
        report_uri=report_uri(spec, run_uri),
    )
    write_json(manifest_path, manifest)
    if run_uri:
        write_text(run_uri, MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return StepResult(
        metrics={"size_bytes": float(size)},
        outputs={"artifact_uri": artifact_uri},
        published={"model": MODEL_DIR, "manifest": MANIFEST_FILE},
    )
