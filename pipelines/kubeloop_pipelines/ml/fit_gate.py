"""The learning-curve gate (``evaluation.fitGate``): the over/under-fit verdict of
:func:`~kubeloop_pipelines.ml.evaluate.learning_curve_verdict` decides registration like a
metric gate does.

Its result has the shape of a metric gate's (:func:`~kubeloop_pipelines.ml.evaluate.check_gates`)
so it joins the same list, summary and report: ``metric`` is ``fit``, ``op`` is ``not in``, the
``threshold`` the rejected verdicts and ``actual`` the verdict; ``text`` carries the verdict's
explanation, which the TrainingRun's ``GatesPassed`` condition then shows.
"""

from __future__ import annotations

from typing import Any

from kubeloop.api.training_run import FitGate

FIT_METRIC = "fit"


def check_fit_gate(gate: FitGate, verdict: tuple[str, str] | None) -> dict[str, Any]:
    """The gate's result for ``verdict`` (``(verdict, explanation)``, or None when no learning
    curves were recorded: then the fit cannot be judged and the gate fails, as a metric gate
    on an unmeasurable metric does)."""
    rejected = ", ".join(gate.reject)
    if verdict is None:
        return {
            "metric": FIT_METRIC,
            "op": "not in",
            "threshold": rejected,
            "actual": None,
            "passed": False,
            "text": f"{FIT_METRIC}=n/a ✗ (no learning curves were recorded: fitGate cannot "
            "judge the fit)",
        }
    name, explanation = verdict
    passed = name not in gate.reject
    mark = "✓" if passed else "✗"
    return {
        "metric": FIT_METRIC,
        "op": "not in",
        "threshold": rejected,
        "actual": name,
        "passed": passed,
        # the explanation says what to change; only a failed gate needs it in the summary
        "text": f"{FIT_METRIC}={name} {mark}"
        + ("" if passed else f" (fitGate rejects {rejected}: {explanation})"),
    }
