"""Preprocess: clean the raw splits, fit the transforms on train, write the prepared layout
(contract.py, ml/preprocess.py) and the data-quality report, then enforce the quality gate.

The report is written and published before the gate is enforced, so a run stopped by the gate
still shows why (``reports/data-quality.html`` in the run directory).
"""

from __future__ import annotations

from pathlib import Path

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop_pipelines.contract import TRANSFORM_FILE, StepResult, read_json
from kubeloop_pipelines.ml import preprocess
from kubeloop_pipelines.ml.quality import enforce_quality_gate, render_quality_html
from kubeloop_pipelines.progress import StepReport, publish

REPORT_NAME = "reports/data-quality.html"


def run(
    spec: TrainingRunSpec,
    *,
    report: StepReport,
    run_uri: str,
    raw_dir: Path,
    prepared_dir: Path,
    report_html: Path,
) -> StepResult:
    """Prepare ``raw_dir`` into ``prepared_dir``; write the HTML report to ``report_html``."""

    def progress(message: str) -> None:
        report.update(message=message)

    quality = preprocess.prepare(raw_dir, prepared_dir, spec.preprocessing, progress=progress)
    report_html.parent.mkdir(parents=True, exist_ok=True)
    report_html.write_text(render_quality_html(quality))
    published: dict[str, str] = {}
    uri = publish(run_uri, REPORT_NAME, report_html)
    if uri:
        published["data_quality_report"] = REPORT_NAME
    rows, missing, outliers = quality["rows"], quality["missing_fraction"], quality["outliers"]
    metrics = {
        "rows_before": float(rows["before"]["total"]),
        "rows_after": float(rows["after"]["total"]),
        "train_rows": float(rows["after"]["train"]),
        "missing_fraction_before": float(missing["before"]),
        "missing_fraction_after": float(missing["after"]),
        "missing_rows_dropped": float(quality["missing_rows_dropped"]),
        "duplicates_found": float(quality["duplicates"]["found"]),
        "duplicates_removed": float(quality["duplicates"]["removed"]),
        "outliers": float(outliers["found"]),
        "outlier_rows_dropped": float(outliers["rows_dropped"]),
    }
    report.update(
        message=f"{metrics['rows_before']:.0f} → {metrics['rows_after']:.0f} rows, "
        f"missing {missing['before']:.1%} → {missing['after']:.1%}",
        force=True,
    )
    enforce_quality_gate(quality)
    transform = read_json(prepared_dir / TRANSFORM_FILE)
    return StepResult(
        metrics=metrics,
        outputs={
            "modality": transform["modality"],
            "input_shape": list(transform["input_shape"]),
            "n_classes": int(transform["n_classes"]),
            "quality_gate_passed": bool(quality["gate"]["passed"]),
        },
        published=published,
    )
