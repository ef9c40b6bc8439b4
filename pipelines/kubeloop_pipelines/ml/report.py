"""The explanation and evaluation report: one self-contained HTML file per trained version.

Everything a reviewer needs before promoting the model, on one page that opens from a bucket
or a laptop with no network: the test metrics and gates, the confusion matrix, the learning
curves with their verdict, the global importances, partial dependence / ICE, LIME local
explanations, counterfactuals and the optimisation decisions. Plots are PNGs inlined as
``data:`` URIs; the page has no scripts and loads nothing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubeloop_pipelines.ml import evaluate as ev
from kubeloop_pipelines.ml.counterfactuals import Counterfactual
from kubeloop_pipelines.ml.explain import Explanation, plot_importance
from kubeloop_pipelines.ml.lime_explain import LocalExplanation
from kubeloop_pipelines.ml.pdp import DependenceCurve, plot_dependence

REPORT_FILE = "reports/report.html"  # in the run directory; the ModelVersion links it
TOP_IMPORTANCES = 20


@dataclass
class ReportInputs:
    """What the report shows; every part is optional (absent parts say why)."""

    title: str
    evaluation: Mapping[str, Any] | None = None  # evaluation.json
    history: Any = None  # history.json: the learning curves
    explanation: Explanation | None = None
    explanation_plots: Mapping[str, bytes] = field(default_factory=dict)
    dependence: Sequence[DependenceCurve] = ()
    lime: Sequence[LocalExplanation] = ()
    lime_inputs: Sequence[str] = ()  # what each LIME row was (its text, or a row summary)
    counterfactuals: Sequence[Counterfactual] = ()
    optimization: Mapping[str, Any] | None = None  # optimization.json
    notes: Sequence[str] = ()  # what was left out and why


def _number(value: Any) -> str:
    if isinstance(value, float):
        return ev.format_value(value) if math.isfinite(value) else "n/a"
    return html.escape(str(value))


def _evaluation_sections(inputs: ReportInputs) -> list[tuple[str, str]]:
    evaluation = inputs.evaluation
    if not evaluation:
        return [("Evaluation", "<p>No evaluation record was found in the run directory.</p>")]
    metrics = sorted((evaluation.get("metrics") or {}).items())
    gates = evaluation.get("gates") or []
    gate_rows = [[g.get("text") or g.get("metric"), "✓" if g.get("passed") else "✗"] for g in gates]
    outcome = "pass" if evaluation.get("gatesPassed") else "fail"
    sections = [
        ("Metrics (test split)", ev.html_table(["metric", "value"], metrics)),
        (
            "Gates",
            (ev.html_table(["gate", "passed"], gate_rows) if gate_rows else "<p>No gates.</p>")
            + f'<p class="{outcome}">{html.escape(str(evaluation.get("gateSummary") or ""))}</p>',
        ),
    ]
    confusion = evaluation.get("confusion")
    if confusion:
        png = ev.plot_confusion(confusion["labels"], confusion["matrix"])
        sections.append(("Confusion matrix", ev.png_tag(png, "confusion matrix")))
    verdict = evaluation.get("verdict")
    curves = ""
    if inputs.history:
        curves = ev.png_tag(
            ev.plot_learning_curves(inputs.history, (verdict or {}).get("verdict", "")),
            "learning curves",
        )
    verdict_html = (
        f"<p><b>{html.escape(verdict['verdict'])}</b>: {html.escape(verdict['explanation'])}</p>"
        if verdict
        else "<p>No verdict: learning curves were not recorded.</p>"
    )
    sections.append(("Learning curves and verdict", verdict_html + curves))
    return sections


def _importance_section(inputs: ReportInputs) -> tuple[str, str]:
    explanation = inputs.explanation
    if explanation is None:
        return ("Feature importance", "<p>No global explanation was computed.</p>")
    ranking = explanation.ranking()[:TOP_IMPORTANCES]
    rows = [[i + 1, name, value] for i, (name, value) in enumerate(ranking)]
    plots = {"importance": plot_importance(explanation), **inputs.explanation_plots}
    return (
        f"Feature importance ({explanation.method})",
        f"<p>{html.escape(explanation.importance_label)}</p>"
        + ev.html_table(["rank", "feature", "importance"], rows)
        + "\n".join(ev.png_tag(png, f"explanation {name}") for name, png in plots.items()),
    )


def _lime_section(inputs: ReportInputs) -> str:
    parts = []
    for item in inputs.lime:
        seen = inputs.lime_inputs[item.row] if item.row < len(inputs.lime_inputs) else ""
        rows = [[condition, weight] for condition, weight in item.weights]
        parts.append(
            f"<h3>Test row {item.row}: predicted {html.escape(item.prediction)}</h3>"
            + (f"<p><code>{html.escape(seen)}</code></p>" if seen else "")
            + f"<p>weights towards <b>{html.escape(item.explained)}</b> (local fit R² "
            f"{_number(item.fit_score)})</p>" + ev.html_table(["condition or word", "weight"], rows)
        )
    return "\n".join(parts)


def _counterfactual_section(inputs: ReportInputs) -> str:
    rows = []
    for cf in inputs.counterfactuals:
        change = "; ".join(f"{name}: {_number(a)} → {_number(b)}" for name, a, b in cf.changes)
        rows.append(
            [cf.row, cf.original_class, cf.new_class or "(no flip within the limits)",
             change or "-", cf.cost]
        )  # fmt: skip
    return (
        "<p>The smallest change found (greedy search over the top features, within each "
        "feature's training range; cost: L1 distance in training standard deviations). Not "
        "guaranteed minimal, nor plausible: a probe of the model, not advice.</p>"
        + ev.html_table(["test row", "predicted", "flips to", "change", "cost (std devs)"], rows)
    )


def _optimization_section(optimization: Mapping[str, Any] | None) -> str:
    if not optimization:
        return "<p>No optimisation was asked for: the trained model is served as is.</p>"
    rows = [
        [v.get("name"), v.get("status"), v.get("score", math.nan), v.get("latency_ms", math.nan),
         v.get("speedup", math.nan), v.get("reason", "")]
        for v in optimization.get("variants") or []
    ]  # fmt: skip
    return (
        f"<p>chosen: <b>{html.escape(str(optimization.get('chosen')))}</b> (objective "
        f"{html.escape(str(optimization.get('objective', '')))})</p>"
        + ev.html_table(["variant", "status", "score", "latency ms", "speed-up", "why"], rows)
    )


def build_report(inputs: ReportInputs) -> str:
    """The complete HTML page."""
    sections = _evaluation_sections(inputs)
    sections.append(_importance_section(inputs))
    if inputs.dependence:
        sections.append(
            (
                "Partial dependence and ICE",
                "<p>Each blue line is one test row with the feature swept across its training "
                "quantiles (all else fixed); red is their mean, the partial dependence.</p>"
                + ev.png_tag(plot_dependence(inputs.dependence), "partial dependence"),
            )
        )
    if inputs.lime:
        sections.append(("Local explanations (LIME)", _lime_section(inputs)))
    if inputs.counterfactuals:
        sections.append(("Counterfactuals", _counterfactual_section(inputs)))
    sections.append(("Optimisation decisions", _optimization_section(inputs.optimization)))
    if inputs.notes:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in inputs.notes)
        sections.append(("Notes", f"<ul>{items}</ul>"))
    return ev.html_page(inputs.title, sections)
