"""explain: global feature importance and per-sample attributions of the trained model, in
terms of the serving features (see ``ml/explain.py``), as plots and an HTML summary.

The eager network is rebuilt from ``arch.json`` + ``state.pt`` and put behind the fitted
transforms (``Sequential(transform, net)``), so attributions are per raw serving feature. A
forest (``model.family: lightgbm``) gets exact TreeSHAP instead, plus the decision path of one
prediction (``reports/decision-path.json``, ``plots/explanation_decision_path.png``).
Publishes ``reports/explanation.html`` and ``plots/explanation_importance.png`` (with
``plots/explanation_samples.png`` for tables, ``plots/explanation_heatmaps.png`` for images).
Metrics: ``importance_<feature>`` of the top 5.
"""

from __future__ import annotations

import html
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop_pipelines.contract import StepError, StepResult
from kubeloop_pipelines.ml import explain as ex
from kubeloop_pipelines.ml import gbdt_explain as gx
from kubeloop_pipelines.ml.evaluate import html_page, html_table, png_tag
from kubeloop_pipelines.ml.gbdt import is_tree_model, load_booster
from kubeloop_pipelines.ml.preprocess import Prepared, load_prepared
from kubeloop_pipelines.ml.train import load_trained, serving_module
from kubeloop_pipelines.progress import StepReport, publish

REPORT = "reports/explanation.html"
DECISION_PATH = "reports/decision-path.json"  # trees only
PLOTS = "plots"
TOP_METRICS = 5


def metric_name(feature: str) -> str:
    """``importance_<feature>`` in lower snake case (what the run's status accepts)."""
    cleaned = re.sub(r"[^0-9a-z]+", "_", feature.lower()).strip("_") or "feature"
    return f"importance_{cleaned}"[:63]


def _write_report(report_html: Path, title: str, sections: list[tuple[str, str]]) -> None:
    report_html.parent.mkdir(parents=True, exist_ok=True)
    report_html.write_text(html_page(title, sections))


def _vocabulary(prepared: Prepared) -> list[str]:
    """The word of each token id of a text model (``transform.json``'s ``text.vocab``)."""
    text = prepared.transform.get("text") or {}
    return [str(word) for word in text.get("vocab") or []]


def _explain_network(
    spec: TrainingRunSpec, prepared: Prepared, model_dir: Path, method: str, report: StepReport
) -> ex.Explanation:
    """Attributions through ``Sequential(transform, net)`` (``ml/explain.py``)."""
    net, arch = load_trained(model_dir)
    modality = str(prepared.modality)
    conv = ex.last_conv(net)
    if method == "gradcam" and (modality != "image" or conv is None):
        raise StepError(
            f"explanation.method='gradcam' needs an image model with convolutions; this run "
            f"trains model.family={arch.get('family')!r} on {modality} data: use gradcam with "
            "family cnn or resnet on images, or one of permutation, shap, integrated_gradients",
            field="explanation.method",
        )
    model = serving_module(net, prepared)
    rows = np.asarray(prepared.serving_rows("test"), dtype=np.float32)
    background = np.asarray(prepared.serving_rows("train"), dtype=np.float32)
    features = [str(f) for f in prepared.serving_features]
    image_shape = tuple(int(s) for s in prepared.input_shape) if modality == "image" else None

    report.update(message=f"explaining {min(spec.explanation.samples, len(rows))} rows ({method})")
    return ex.explain(
        model,
        method=method,
        task=str(prepared.task),
        features=features,
        classes=[str(c) for c in prepared.classes],
        rows=rows,
        y=np.asarray(prepared.y_test),
        background=background,
        samples=spec.explanation.samples,
        modality=modality,
        image_shape=image_shape,
        conv_layer=conv,
        embedding=ex.token_embedding(net) if modality == "text" else None,
        vocabulary=_vocabulary(prepared) if modality == "text" else (),
        seed=spec.data.split.seed,
    )


def _explain_forest(
    spec: TrainingRunSpec, prepared: Prepared, model_dir: Path, method: str, report: StepReport
) -> tuple[ex.Explanation, dict[str, Any]]:
    """Exact TreeSHAP and the decision path of the first test row (``ml/gbdt_explain.py``)."""
    booster = load_booster(model_dir)
    rows = np.asarray(prepared.serving_rows("test"), dtype=np.float32)
    report.update(message=f"explaining {min(spec.explanation.samples, len(rows))} rows (TreeSHAP)")
    explanation = gx.explain_trees(
        booster, task=str(prepared.task), features=[str(f) for f in prepared.serving_features],
        classes=[str(c) for c in prepared.classes], transform=prepared.transform, rows=rows,
        x=prepared.x_test, samples=spec.explanation.samples, method=method,
    )  # fmt: skip
    return explanation, gx.decision_path(booster, prepared.x_test[0], transform=prepared.transform)


def run(
    spec: TrainingRunSpec,
    *,
    report: StepReport,
    run_uri: str,
    prepared_dir: Path,
    model_dir: Path,
    report_html: Path,
) -> StepResult:
    method = spec.explanation.method
    if method == "none":
        _write_report(
            report_html,
            "Explanation",
            [("Off", "<p>No explanation was asked for (<code>explanation.method: none</code>)."
                     "</p>")],
        )  # fmt: skip
        if run_uri:
            publish(run_uri, REPORT, report_html)
        return StepResult(
            outputs={"method": "none"},
            published={"explanation_report": REPORT} if run_uri else {},
        )

    report.update(message="loading the model and the prepared data", force=True)
    prepared = load_prepared(prepared_dir)
    modality = str(prepared.modality)
    image_shape = tuple(int(s) for s in prepared.input_shape) if modality == "image" else None
    decision: dict[str, Any] | None = None
    if is_tree_model(model_dir):
        explanation, decision = _explain_forest(spec, prepared, model_dir, method, report)
    else:
        explanation = _explain_network(spec, prepared, model_dir, method, report)

    plots = {"importance": ex.plot_importance(explanation)}
    if explanation.heatmaps is not None and image_shape:
        plots["heatmaps"] = ex.plot_heatmaps(explanation, image_shape)
    elif modality == "tabular":
        plots["samples"] = ex.plot_samples(explanation)
    if decision is not None:
        plots["decision_path"] = gx.plot_decision_path(decision)
    ranking = explanation.ranking()
    top_rows = [[i + 1, name, value] for i, (name, value) in enumerate(ranking[:20])]
    sections = [
        (
            "Method",
            f"<p><b>{html.escape(method)}</b>: {html.escape(explanation.importance_label)}. "
            "Attributions are computed through the fitted transforms and the network, so they "
            "are in terms of the raw features serving receives.</p>"
            + "".join(f"<p>{html.escape(n)}</p>" for n in explanation.notes),
        ),
        ("Top features", html_table(["rank", "feature", "importance"], top_rows)),
        (
            "Per-sample attributions (Integrated Gradients unless noted)",
            html_table(
                ["sample", "prediction", "strongest features (attribution)"],
                ex.top_contributions(explanation),
            ),
        ),
        ("Plots", "\n".join(png_tag(png, name) for name, png in plots.items())),
    ]
    if decision is not None:
        sections.append(
            (
                "Decision path (the trees that moved test row 0 most)",
                f"<pre>{html.escape(json.dumps(decision, indent=2))}</pre>",
            )
        )
    _write_report(report_html, "Explanation", sections)

    published: dict[str, str] = {}
    if run_uri:
        published["explanation_report"] = REPORT
        publish(run_uri, REPORT, report_html)
        with tempfile.TemporaryDirectory(prefix="kubeloop-explain-") as tmp:
            for name, png in plots.items():
                path = Path(tmp) / f"{name}.png"
                path.write_bytes(png)
                published[f"plot_explanation_{name}"] = f"{PLOTS}/explanation_{name}.png"
                publish(run_uri, f"{PLOTS}/explanation_{name}.png", path)
            if decision is not None:
                path = Path(tmp) / "decision-path.json"
                path.write_text(json.dumps(decision, indent=2) + "\n")
                publish(run_uri, DECISION_PATH, path)
                published["decision_path"] = DECISION_PATH
    metrics = {metric_name(name): value for name, value in ranking[:TOP_METRICS]}
    return StepResult(
        metrics=metrics,
        outputs={"method": method, "top_features": [name for name, _ in ranking[:TOP_METRICS]]},
        published=published,
    )
