"""tune: the hyperparameter search (``ml/tune.py``) over the prepared data.

Without ``spec.tuning`` the step only writes the spec's own hyperparameters, so ``train``
always reads one params file. With it, every trial trains on the train split and scores the
validation split; after each trial the step record's ``trials`` (completed/total/pruned/
bestParams/bestValue) and ``message`` ("trial 7/20") move, which ``kubectl get tr`` shows.

Writes ``params_path`` (JSON: every hyperparameter train uses, camelCase, the best trial's
values applied) and ``report_html`` (trial table and optimisation history), published as
``reports/tuning.html``.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from kubeloop.api.training_run import TrainingRunSpec, Tuning
from kubeloop_pipelines.contract import StepResult, write_json
from kubeloop_pipelines.ml import tune as tn
from kubeloop_pipelines.ml.evaluate import figure_png, html_page, html_table, new_figure, png_tag
from kubeloop_pipelines.ml.fitting import train_prepared
from kubeloop_pipelines.progress import StepReport, publish

REPORT = "reports/tuning.html"


def plot_history(result: tn.TuneResult) -> bytes:
    """Objective per trial (completed: dots; pruned: crosses at their last per-epoch value)
    and the best value so far."""
    fig, ax = new_figure(7.0, 4.0)
    done = [t for t in result.trials if t.state == "complete" and t.value is not None]
    ax.scatter([t.number for t in done], [t.value for t in done], s=18, label="trial")
    best: list[float] = []
    pick = min if result.direction == "minimize" else max
    for t in result.trials:
        if t.state == "complete" and t.value is not None and math.isfinite(t.value):
            best.append(t.value if not best else pick(best[-1], t.value))
        elif best:
            best.append(best[-1])
        else:
            best.append(math.nan)
    ax.step([t.number for t in result.trials], best, where="post", color="C1", label="best")
    pruned = [t for t in result.trials if t.state == "pruned" and t.last_report is not None]
    if pruned:
        ax.scatter(
            [t.number for t in pruned], [t.last_report for t in pruned], marker="x",
            color="grey", label="pruned (last report)",
        )  # fmt: skip
    ax.set(
        xlabel="trial",
        ylabel=f"validation {result.metric}",
        title=f"Optimisation history ({result.algorithm}, {result.direction})",
    )
    ax.legend()
    return figure_png(fig)


def tuning_report(tuning: Tuning, result: tn.TuneResult) -> str:
    names = [p.name for p in tuning.search_space]
    rows: list[list[Any]] = [
        [t.number, t.state, "" if t.value is None else t.value, t.epochs, round(t.seconds, 2)]
        + [tn.format_param(t.params.get(n, "")) for n in names]
        + [t.error]
        for t in result.trials
    ]
    best = ", ".join(f"{k}={tn.format_param(v)}" for k, v in result.best_params.items())
    summary = (
        f"<p><b>{html.escape(result.algorithm)}</b> search, {result.total} trials "
        f"({result.completed} completed, {result.pruned} pruned, {result.failed} failed) in "
        f"{result.seconds:.1f} s. Best validation {html.escape(result.metric)} "
        f"<b>{result.best_value:.4g}</b> with {html.escape(best)}.</p>"
    )
    return html_page(
        "Hyperparameter tuning",
        [
            ("Summary", summary),
            ("Optimisation history", png_tag(plot_history(result), "optimisation history")),
            (
                "Trials",
                html_table(["trial", "state", "value", "epochs", "seconds", *names, "error"], rows),
            ),
        ],
    )


def run(
    spec: TrainingRunSpec,
    *,
    report: StepReport,
    run_uri: str,
    prepared_dir: Path,
    params_path: Path,
    report_html: Path,
) -> StepResult:
    """Tune (or pass the spec's hyperparameters on); see the module docstring."""
    tuning = spec.tuning
    if tuning is None:
        write_json(params_path, tn.resolved_params(spec.model, spec.imbalance, {}))
        report_html.parent.mkdir(parents=True, exist_ok=True)
        report_html.write_text(
            html_page(
                "Hyperparameter tuning",
                [("Off", "<p>No tuning was asked for: training uses the spec's values.</p>")],
            )
        )
        return StepResult(outputs={"tuned": False})

    from kubeloop_pipelines.ml.preprocess import load_prepared

    prepared = load_prepared(prepared_dir)
    tn.validate(tuning, str(prepared.task))
    total = tn.grid_size(tuning) if tuning.algorithm == "grid" else tuning.max_trials
    report.update(
        message=f"trial 0/{total}",
        trials={"completed": 0, "total": total, "pruned": 0, "progress": f"0/{total}"},
        force=True,
    )

    def objective(params: dict[str, Any], report_epoch: tn.Report) -> float:
        result = train_prepared(
            spec, prepared, params, callback=lambda s: report_epoch(s.epoch, s.val_metric)
        )
        return result.val_metric

    def progress(p: tn.TuneProgress) -> None:
        best = (
            "" if p.best_value is None else f", best {tuning.objective.metric}={p.best_value:.4g}"
        )
        report.update(
            trials=p.trials_status(),
            message=f"trial {p.completed}/{p.total} ({p.last.state}){best}",
            force=True,
        )

    result = tn.run_study(
        tuning,
        objective,
        task=str(prepared.task),
        max_resource=tn.max_epochs(tuning, spec.model),
        progress=progress,
    )
    write_json(params_path, tn.resolved_params(spec.model, spec.imbalance, result.best_params))
    report_html.parent.mkdir(parents=True, exist_ok=True)
    report_html.write_text(tuning_report(tuning, result))
    published = {}
    if run_uri:
        publish(run_uri, REPORT, report_html)
        published["tuning_report"] = REPORT
    return StepResult(
        metrics={
            "best_value": result.best_value,
            "trials_completed": float(len(result.trials)),
            "trials_pruned": float(result.pruned),
            "trials_failed": float(result.failed),
        },
        outputs={
            "tuned": True,
            "best_params": {k: tn.format_param(v) for k, v in result.best_params.items()},
            "best_value": result.best_value,
        },
        published=published,
    )
