"""train: the final model, with the spec's settings and the tuned hyperparameters.

Reads the hyperparameters from ``params_path`` (written by ``tune``; when it is missing, the
spec's own values), trains on the train split with early stopping on the validation split
(``ml/train.py``), reports ``epoch`` and "epoch 12/40 loss …" while it runs, and writes the
model directory of ``contract.py`` (serving artifact with the transforms baked in, arch,
weights, history, params). Publishes ``model/`` and ``plots/learning-curves.png``;
``curves_html`` holds the learning curves as a self-contained page.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.steps import MODEL_DIR
from kubeloop_pipelines.contract import StepError, StepResult, read_json
from kubeloop_pipelines.ml.evaluate import html_page, html_table, plot_learning_curves, png_tag
from kubeloop_pipelines.ml.fitting import save_trained, train_prepared
from kubeloop_pipelines.ml.train import EpochStats, FitResult
from kubeloop_pipelines.ml.tune import format_param, resolved_params
from kubeloop_pipelines.progress import StepReport, publish

CURVES = "plots/learning-curves.png"


def read_params(spec: TrainingRunSpec, params_path: Path) -> dict[str, Any]:
    """The hyperparameters to train with: the params file (tune's output), else the spec's."""
    if not params_path.is_file():
        return resolved_params(spec.model, spec.imbalance, {})
    try:
        params = read_json(params_path)
    except (OSError, ValueError) as exc:
        raise StepError(f"{params_path} cannot be read as JSON: {exc}", permanent=False) from exc
    if not isinstance(params, Mapping):
        raise StepError(
            f"{params_path} holds a {type(params).__name__}; expected a JSON object of "
            "hyperparameters (name → value)",
        )
    return dict(params)


def curves_page(result: FitResult, png: bytes | None) -> str:
    rows = [
        [h.epoch, h.train_loss, h.val_loss, h.val_metric, h.lr, round(h.seconds, 2)]
        for h in result.history
    ]
    kept = (
        f"Early stopping kept the weights of epoch {result.best_epoch} of {result.epochs_run}."
        if result.stopped_early or result.best_epoch != result.epochs_run
        else f"The model holds the weights of the last epoch ({result.epochs_run})."
    )
    sections = [("Summary", f"<p>{kept}</p>")]
    if png is not None:
        sections.append(("Learning curves", png_tag(png, "learning curves")))
    header = ["epoch", "train loss", "validation loss", f"validation {result.metric}", "lr", "s"]
    sections.append(("Epochs", html_table(header, rows)))
    return html_page("Training", sections)


def run(
    spec: TrainingRunSpec,
    *,
    report: StepReport,
    run_uri: str,
    prepared_dir: Path,
    params_path: Path,
    model_dir: Path,
    curves_html: Path,
) -> StepResult:
    """Train, save and publish the model; see the module docstring."""
    from kubeloop_pipelines.ml.preprocess import load_prepared

    params = read_params(spec, params_path)
    prepared = load_prepared(prepared_dir)
    shown = ", ".join(
        f"{k}={format_param(params[k])}" for k in ("family", "learningRate", "batchSize")
        if k in params
    )  # fmt: skip
    report.update(message=f"training ({shown})", force=True)

    def on_epoch(stats: EpochStats) -> None:
        report.update(
            epoch=stats.epoch,
            message=(
                f"epoch {stats.epoch}/{stats.epochs} loss {stats.train_loss:.4f} "
                f"val_loss {stats.val_loss:.4f}"
            ),
            force=stats.epoch == stats.epochs,
        )

    result = train_prepared(spec, prepared, params, callback=on_epoch)
    report.update(message=f"saving the model ({result.epochs_run} epochs)", force=True)
    save_trained(model_dir, result, prepared=prepared, params=params)

    png = plot_learning_curves(result.history_json()) if spec.evaluation.learning_curves else None
    curves_html.parent.mkdir(parents=True, exist_ok=True)
    curves_html.write_text(curves_page(result, png))
    published: dict[str, str] = {}
    if run_uri:
        publish(run_uri, MODEL_DIR, model_dir)
        published["model"] = MODEL_DIR
        if png is not None:
            with tempfile.TemporaryDirectory(prefix="kubeloop-train-") as tmp:
                path = Path(tmp) / "learning-curves.png"
                path.write_bytes(png)
                publish(run_uri, CURVES, path)
            published["learning_curves"] = CURVES
    kept = result.kept
    return StepResult(
        metrics={
            "epochs_run": float(result.epochs_run),
            "best_val_loss": result.best_val_loss,
            "train_samples_per_s": result.train_samples_per_s,
            f"val_{result.metric}": kept.val_metric,
        },
        outputs={
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "device": result.device,
        },
        published=published,
    )
