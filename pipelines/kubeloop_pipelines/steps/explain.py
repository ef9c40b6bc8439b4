"""explain: global feature importance and per-sample attributions of the trained model, in
terms of the serving features (see ``ml/explain.py``), as plots and an HTML summary.

The eager network is rebuilt from ``arch.json`` + ``state.pt`` and put behind the fitted
transforms (``Sequential(transform, net)``), so attributions are per raw serving feature. A
forest (``model.family: lightgbm``) gets exact TreeSHAP instead, plus the decision path of one
prediction (``reports/decision-path.json``, ``plots/explanation_decision_path.png``).
Publishes ``reports/explanation.html`` and ``plots/explanation_importance.png`` (with
``plots/explanation_samples.png`` for tables, ``plots/explanation_heatmaps.png`` for images).
Metrics: ``importance_<feature>`` of the top 5.

With ``explanation.lime`` / ``partialDependence`` / ``counterfactuals`` the serving artifact
(``load_model``, exactly what serving runs) is also probed locally: LIME for a few held-out
rows (tables, text), partial dependence and ICE of the top features and counterfactuals
(tables). Everything — the evaluation record and learning curves, the importances, these and
the optimisation decisions — goes into one self-contained ``reports/report.html``
(``ml/report.py``), which the register step links from the ModelVersion
(``spec.lineage.reportUri``).
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
from kubeloop.contract.steps import EVALUATION_FILE
from kubeloop.serving.artifact import load_model
from kubeloop_pipelines.contract import HISTORY_FILE, StepError, StepResult
from kubeloop_pipelines.ml import counterfactuals as cf
from kubeloop_pipelines.ml import explain as ex
from kubeloop_pipelines.ml import gbdt_explain as gx
from kubeloop_pipelines.ml import lime_explain as lx
from kubeloop_pipelines.ml import pdp
from kubeloop_pipelines.ml.evaluate import html_page, html_table, png_tag
from kubeloop_pipelines.ml.gbdt import is_tree_model, load_booster
from kubeloop_pipelines.ml.preprocess import Prepared, load_prepared
from kubeloop_pipelines.ml.report import REPORT_FILE, ReportInputs, build_report
from kubeloop_pipelines.ml.train import load_trained, serving_module
from kubeloop_pipelines.progress import StepReport, local_path, publish

REPORT = "reports/explanation.html"
DECISION_PATH = "reports/decision-path.json"  # trees only
PLOTS = "plots"
TOP_METRICS = 5
SWEPT_FEATURES = 4  # partial dependence: the most important features
SEARCHED_FEATURES = 5  # counterfactuals: the features the search may change
OPTIMIZATION_FILE = "optimization.json"  # written by the optimize step into the model dir


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


def _run_json(run_uri: str, name: str) -> Any:
    """A JSON file an earlier step published into the run directory (None if absent)."""
    if not run_uri:
        return None
    try:
        path = local_path(run_uri)
        if path is not None:
            return json.loads((path / name).read_text())
        import fsspec  # object stores: only the pipeline image needs fsspec

        with fsspec.open(f"{run_uri.rstrip('/')}/{name}", "r") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None


def _model_json(model_dir: Path, name: str) -> Any:
    try:
        return json.loads((model_dir / name).read_text())
    except (OSError, ValueError):
        return None


def _local_explanations(
    spec: TrainingRunSpec,
    prepared: Prepared,
    model_dir: Path,
    explanation: ex.Explanation,
    report: StepReport,
) -> ReportInputs:
    """LIME, partial dependence / ICE and counterfactuals the spec asks for, through the
    serving artifact; what does not apply to this data is a note in the report."""
    asked = spec.explanation
    inputs = ReportInputs(title="Explanation and evaluation report")
    if not (asked.lime or asked.partial_dependence or asked.counterfactuals):
        return inputs
    served = load_model(model_dir)
    modality, task = str(prepared.modality), str(prepared.task)
    features, classes = [str(f) for f in prepared.serving_features], list(served.classes)
    training = np.asarray(prepared.serving_rows("train"), dtype=np.float32)
    training = ex.fill_missing(training, training)
    test = np.asarray(prepared.serving_rows("test"), dtype=np.float32)
    test = ex.fill_missing(test, training)
    local = test[: asked.local_rows]
    notes: list[str] = []
    top = [features.index(name) for name, _ in explanation.ranking() if name in features]
    tabular = modality == "tabular"
    if asked.lime and modality == "text":
        report.update(message=f"LIME on {len(local)} test texts", force=True)
        vocabulary = _vocabulary(prepared)
        texts = [lx.decode_tokens(row, vocabulary) for row in local]
        on_texts = lx.text_predictor(served.predict, vocabulary, test.shape[1])
        inputs.lime = lx.lime_text(on_texts, texts, task=task, classes=classes,
                                   seed=spec.data.split.seed)  # fmt: skip
        inputs.lime_inputs = texts
    elif asked.lime and tabular:
        report.update(message=f"LIME on {len(local)} test rows", force=True)
        inputs.lime = lx.lime_tabular(
            served.predict, training, local, features=features, task=task, classes=classes,
            seed=spec.data.split.seed,
        )  # fmt: skip
    elif asked.lime:
        notes.append(f"LIME: tables and text only; this run's data is {modality}")
    if asked.partial_dependence and tabular:
        report.update(message="partial dependence and ICE of the top features", force=True)
        inputs.dependence = pdp.dependence_curves(
            served.predict, test, training, features=features, chosen=top[:SWEPT_FEATURES],
            task=task, classes=classes,
        )  # fmt: skip
    elif asked.partial_dependence:
        notes.append(f"partial dependence: tables only; this run's data is {modality}")
    if asked.counterfactuals and tabular:
        report.update(message=f"counterfactuals of {len(local)} test rows", force=True)
        inputs.counterfactuals = cf.counterfactuals(
            served.predict, local, training, features=features, classes=classes,
            candidates=top[:SEARCHED_FEATURES],
        )  # fmt: skip
    elif asked.counterfactuals:
        notes.append(f"counterfactuals: tables only; this run's data is {modality}")
    inputs.notes = notes
    return inputs


def _full_report(
    spec: TrainingRunSpec,
    prepared: Prepared,
    model_dir: Path,
    *,
    run_uri: str,
    explanation: ex.Explanation,
    plots: dict[str, bytes],
    report: StepReport,
) -> str:
    """The explanation and evaluation report (``ml/report.py``): the evaluate step's record
    from the run directory, the learning curves and optimisation record from the model
    directory, this step's explanations."""
    full = _local_explanations(spec, prepared, model_dir, explanation, report)
    full.evaluation = _run_json(run_uri, EVALUATION_FILE)
    full.history = _model_json(model_dir, HISTORY_FILE) if spec.evaluation.learning_curves else None
    full.optimization = _model_json(model_dir, OPTIMIZATION_FILE)
    full.explanation = explanation
    full.explanation_plots = {k: v for k, v in plots.items() if k != "importance"}
    return build_report(full)


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

    full_html = _full_report(
        spec, prepared, model_dir, run_uri=run_uri, explanation=explanation, plots=plots,
        report=report,
    )  # fmt: skip

    published: dict[str, str] = {}
    if run_uri:
        published["explanation_report"] = REPORT
        publish(run_uri, REPORT, report_html)
        with tempfile.TemporaryDirectory(prefix="kubeloop-explain-") as tmp:
            (Path(tmp) / "report.html").write_text(full_html)
            published["report"] = REPORT_FILE
            publish(run_uri, REPORT_FILE, Path(tmp) / "report.html")
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
