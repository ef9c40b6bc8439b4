"""evaluate: test-split metrics of the serving artifact, the registration gates, the
learning-curve verdict and the evaluation report.

The model evaluated is the exported artifact (``model.pt2`` + ``model.json``) fed the raw test
rows, exactly as serving will be fed: the metrics are what serving will produce, transforms
included. ``latency_ms`` and ``size_mb`` are measured on the same artifact so gates can use
them. With ``data.groupColumn`` the test rows are also ranked within their groups
(``map_at_k``, ``ndcg_at_k``: ml/ranking.py). ``evaluation.fitGate`` adds the learning-curve
verdict to the gates (ml/fit_gate.py). Writes ``evaluation.json``::

    {"task": ..., "metrics": {...}, "gates": [{metric, op, threshold, actual, passed, text}],
     "gatesPassed": bool, "gateSummary": "f1=0.97>=0.9 ✓ ...",
     "verdict": {"verdict": "good fit", "explanation": ...} | null,
     "confusion": {"labels": [...], "matrix": [[...]]} | null,
     "ranking": {"k": 10, "groups": 36, "groupsWithoutRelevant": 2} | null}

and publishes ``reports/evaluation.html``, ``metrics.json`` and ``plots/evaluation_*.png``.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.steps import EVALUATION_FILE
from kubeloop.serving.artifact import ArtifactError, load_model
from kubeloop_pipelines.contract import HISTORY_FILE, StepError, StepResult, write_json
from kubeloop_pipelines.ml import evaluate as ev
from kubeloop_pipelines.ml import ranking
from kubeloop_pipelines.ml.fit_gate import check_fit_gate
from kubeloop_pipelines.ml.preprocess import Prepared, load_prepared
from kubeloop_pipelines.progress import StepReport, publish

REPORT = "reports/evaluation.html"
METRICS = "metrics.json"
PLOTS = "plots"
# Losses whose "guessing" level is ln(classes) (see learning_curve_verdict); focal loss is not.
CROSS_ENTROPY_STRATEGIES = ("none", "class_weights", "oversample", "undersample", "smote")


def _history(model_dir: Path) -> Any:
    path = model_dir / HISTORY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _baseline_loss(spec: TrainingRunSpec, task: str, n_classes: int) -> float | None:
    """The training loss of guessing: ln(classes) for cross-entropy, 1 for the standardised
    MSE of regression; unknown (None) for focal loss."""
    if task == "regression":
        return 1.0
    if spec.imbalance.strategy in CROSS_ENTROPY_STRATEGIES and n_classes >= 2:
        return math.log(n_classes)
    return None


def _rank_test_groups(
    spec: TrainingRunSpec, prepared: Prepared, task: str, outputs: Any, classes: list[str]
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """map_at_k and ndcg_at_k of the test rows ranked within their groups, and the details for
    evaluation.json; nothing without data.groupColumn."""
    groups = prepared.group_ids("test")
    if groups is None:
        return {}, None
    k = spec.evaluation.ranking.k if spec.evaluation.ranking else ranking.DEFAULT_K
    return ranking.ranking_metrics(task, prepared.y_test, outputs, groups, classes=classes, k=k)


def _judge(
    spec: TrainingRunSpec,
    metrics: dict[str, float],
    task: str,
    *,
    ranked: bool,
    verdict: tuple[str, str] | None,
) -> tuple[bool, list[dict[str, Any]], str]:
    """The metric gates, then the fit gate (when the spec has one) on the verdict: ``(all
    passed, one result per gate, the one-line summary)``."""
    passed, gates = ev.check_gates(spec.evaluation.gates, metrics, task, ranked=ranked)
    if spec.evaluation.fit_gate is not None:
        gates.append(check_fit_gate(spec.evaluation.fit_gate, verdict))
        passed = passed and bool(gates[-1]["passed"])
    return passed, gates, ev.gate_summary(gates)


def run(
    spec: TrainingRunSpec,
    *,
    report: StepReport,
    run_uri: str,
    prepared_dir: Path,
    model_dir: Path,
    evaluation_path: Path,
    report_html: Path,
) -> StepResult:
    report.update(message="loading the serving artifact and the test split", force=True)
    prepared = load_prepared(prepared_dir)
    try:
        model = load_model(model_dir)
    except ArtifactError as exc:
        raise StepError(f"the trained model cannot be loaded: {exc}", permanent=False) from exc
    rows = np.asarray(prepared.serving_rows("test"), dtype=np.float32)
    y_test = np.asarray(prepared.y_test)
    task, classes = model.task, list(model.classes)

    report.update(message=f"predicting {len(rows)} test rows with the serving artifact")
    outputs = model.predict(rows)
    metrics = ev.compute_metrics(task, y_test, outputs, classes=classes)
    ranking_scores, ranked = _rank_test_groups(spec, prepared, task, outputs, classes)
    metrics.update(ranking_scores)
    report.update(message="measuring serving latency and size")
    metrics.update(ev.serving_cost(model, model_dir, rows))

    history = _history(model_dir) if spec.evaluation.learning_curves else None
    verdict = (
        ev.learning_curve_verdict(history, baseline_loss=_baseline_loss(spec, task, len(classes)))
        if history
        else None
    )
    passed, gates, summary = _judge(spec, metrics, task, ranked=ranked is not None, verdict=verdict)
    plots: dict[str, bytes] = {}
    matrix: tuple[list[str], list[list[int]]] | None = None
    roc: tuple[list[float], list[float], list[float]] | None = None
    if task == "classification":
        matrix = ev.confusion(y_test, outputs, classes)
        plots["confusion"] = ev.plot_confusion(*matrix)
        if len(np.unique(y_test)) > 1:
            plots["roc_pr"] = ev.plot_roc_pr(y_test, outputs, classes)
        if len(classes) == 2 and len(np.unique(y_test)) == 2:
            roc = ev.roc_points(y_test, outputs)
    if verdict is not None:
        plots["learning_curves"] = ev.plot_learning_curves(history, verdict[0])

    evaluation: dict[str, Any] = {
        "task": task,
        "metrics": metrics,
        "gates": gates,
        "gatesPassed": passed,
        "gateSummary": summary,
        "verdict": {"verdict": verdict[0], "explanation": verdict[1]} if verdict else None,
        "confusion": {"labels": matrix[0], "matrix": matrix[1]} if matrix else None,
        "ranking": ranked,
        "testRows": len(rows),
    }
    write_json(evaluation_path, evaluation)
    html = ev.evaluation_report(
        metrics=metrics, gates=gates, passed=passed, verdict=verdict, plots=plots
    )
    report_html.parent.mkdir(parents=True, exist_ok=True)
    report_html.write_text(html)

    published = {"evaluation_report": REPORT, "metrics": METRICS}
    if run_uri:
        publish(run_uri, REPORT, report_html)
        # the operator reads the gates from here, whichever executor ran the pipeline
        publish(run_uri, EVALUATION_FILE, evaluation_path)
        published["evaluation"] = EVALUATION_FILE
        with tempfile.TemporaryDirectory(prefix="kubeloop-evaluate-") as tmp:
            metrics_file = write_json(Path(tmp) / METRICS, metrics)
            publish(run_uri, METRICS, metrics_file)
            for name, png in plots.items():
                path = Path(tmp) / f"{name}.png"
                path.write_bytes(png)
                published[f"plot_evaluation_{name}"] = f"{PLOTS}/evaluation_{name}.png"
                publish(run_uri, f"{PLOTS}/evaluation_{name}.png", path)
    else:
        published = {}
    return StepResult(
        metrics=metrics,
        confusion=matrix,
        roc=roc,
        outputs={
            "gates_passed": passed,
            "gate_summary": summary,
            "verdict": verdict[0] if verdict else "",
        },
        published=published,
    )
