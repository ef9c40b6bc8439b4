"""The data-quality report that preprocessing writes (``quality.json``), the quality gate on it
and its HTML rendering.

The report holds the row counts before and after cleaning, the missing fraction before and
after (overall and per column), duplicates, outliers and the class balance; its ``gate`` entry
is :func:`evaluate_quality_gate`'s verdict, which :func:`enforce_quality_gate` turns into a
:class:`~kubeloop_pipelines.contract.StepError`. :func:`render_quality_html` makes the
self-contained page published as the run's data-quality report.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from kubeloop.api.training_run import Preprocessing, QualityGate
from kubeloop_pipelines.contract import SPLITS, StepError
from kubeloop_pipelines.ml.datasets import DatasetSchema, label_strings

# --------------------------------------------------------------------------------------------
# measuring


def missing_fractions(frames: Mapping[str, pd.DataFrame], names: Sequence[str]) -> dict[str, float]:
    """Per feature, the fraction of rows (all splits together) where it is missing."""
    joined = pd.concat([frames[s][list(names)] for s in SPLITS], ignore_index=True)
    return {name: float(joined[name].isna().mean()) for name in names}


def class_counts(frame: pd.DataFrame, schema: DatasetSchema) -> dict[str, int]:
    """Rows per class label of ``frame`` (every class of the schema, zero included)."""
    counts = label_strings(frame[schema.target]).value_counts()
    return {label: int(counts.get(label, 0)) for label in schema.classes}


@dataclass
class CleaningCounts:
    """What each cleaning stage found and removed (summed over the splits), for the report."""

    duplicates_found: int = 0
    duplicates_removed: int = 0
    missing_rows_dropped: int = 0
    outlier_rows_dropped: int = 0
    outliers_found: dict[str, int] = field(default_factory=dict)


def _missing_after(
    transform: Mapping[str, Any], x: npt.NDArray[Any], names: Sequence[str]
) -> dict[str, float]:
    """Per source feature, the fraction of rows whose network input is still NaN."""
    if transform["modality"] != "tabular" or len(x) == 0:
        return dict.fromkeys(names, 0.0)
    nan = np.isnan(x)
    source = np.asarray(transform["columns"]["source"])
    return {
        name: float(nan[:, source == i].any(axis=1).mean()) if (source == i).any() else 0.0
        for i, name in enumerate(names)
    }


# --------------------------------------------------------------------------------------------
# the report and the gate


def quality_report(
    schema: DatasetSchema,
    *,
    transform: Mapping[str, Any],
    preprocessing: Preprocessing,
    frames: Mapping[str, pd.DataFrame],
    arrays: Mapping[str, npt.NDArray[Any]],
    rows_before: Mapping[str, int],
    missing_before: Mapping[str, float],
    cleaning: CleaningCounts,
) -> dict[str, Any]:
    """The data-quality report of one preprocessing run, its gate evaluated into
    ``["gate"]``."""
    names = schema.feature_names
    total_before = sum(rows_before.values())
    rows_after = {name: len(frames[name]) for name in SPLITS}
    joined = np.concatenate([arrays[s] for s in SPLITS], axis=0)
    missing_after = _missing_after(transform, joined, names)
    outlier_bounds = transform.get("outliers", {}).get("bounds") or [None] * len(names)
    quality: dict[str, Any] = {
        "source": schema.source,
        "modality": schema.modality,
        "task": schema.task,
        "rows": {
            "before": dict(rows_before) | {"total": total_before},
            "after": rows_after | {"total": sum(rows_after.values())},
        },
        "missing_fraction": {
            "before": float(np.mean(list(missing_before.values()))) if names else 0.0,
            "after": float(np.mean(list(missing_after.values()))) if names else 0.0,
        },
        "columns": [
            {
                "name": name,
                "kind": feature.kind,
                "missing_before": missing_before[name],
                "missing_after": missing_after[name],
                "outliers": cleaning.outliers_found.get(name, 0),
                "outlier_bounds": outlier_bounds[i],
            }
            for i, (name, feature) in enumerate(zip(names, schema.features, strict=True))
        ],
        "duplicates": {
            "found": cleaning.duplicates_found,
            "fraction": cleaning.duplicates_found / max(total_before, 1),
            "removed": cleaning.duplicates_removed,
        },
        "missing_rows_dropped": cleaning.missing_rows_dropped,
        "missing_strategy": preprocessing.missing.strategy,
        "outliers": {
            "method": preprocessing.outliers.method,
            "action": preprocessing.outliers.action,
            "threshold": preprocessing.outliers.threshold,
            "found": sum(cleaning.outliers_found.values()),
            "rows_dropped": cleaning.outlier_rows_dropped,
        },
        "class_balance": {},
    }
    if schema.task == "classification":
        quality["class_balance"]["after"] = {
            name: class_counts(frames[name], schema) for name in SPLITS
        }
    quality["gate"] = evaluate_quality_gate(quality, preprocessing.quality_gate)
    return quality


def evaluate_quality_gate(quality: Mapping[str, Any], gate: QualityGate | None) -> dict[str, Any]:
    """The gate's thresholds, ``passed`` and its ``violations`` ({field, message}); missing
    cells and duplicates are measured before cleaning, rows after."""
    if gate is None:
        return {"enabled": False, "passed": True, "violations": []}
    prefix = "preprocessing.qualityGate"
    missing = float(quality["missing_fraction"]["before"])
    duplicates = float(quality["duplicates"]["fraction"])
    rows = int(quality["rows"]["after"]["total"])
    worst = max(quality["columns"], key=lambda c: c["missing_before"], default=None)
    violations: list[dict[str, str]] = []
    if missing > gate.max_missing_fraction:
        worst_text = f" (worst: {worst['name']!r} {worst['missing_before']:.1%})" if worst else ""
        violations.append(
            {
                "field": f"{prefix}.maxMissingFraction",
                "message": f"{prefix}.maxMissingFraction={gate.max_missing_fraction}: "
                f"{missing:.1%} of the feature cells are missing{worst_text}; raise the limit, "
                "drop the emptiest columns from data.features or fix the data",
            }
        )
    if duplicates > gate.max_duplicate_fraction:
        violations.append(
            {
                "field": f"{prefix}.maxDuplicateFraction",
                "message": f"{prefix}.maxDuplicateFraction={gate.max_duplicate_fraction}: "
                f"{duplicates:.1%} of the rows duplicate another row; raise the limit or "
                "deduplicate the data",
            }
        )
    if rows < gate.min_rows:
        violations.append(
            {
                "field": f"{prefix}.minRows",
                "message": f"{prefix}.minRows={gate.min_rows}: only {rows} rows are left after "
                f"cleaning (of {quality['rows']['before']['total']}); lower the limit, relax "
                "the cleaning (missing.strategy, outliers.action) or add data",
            }
        )
    return {
        "enabled": True,
        "passed": not violations,
        "violations": violations,
        "maxMissingFraction": gate.max_missing_fraction,
        "maxDuplicateFraction": gate.max_duplicate_fraction,
        "minRows": gate.min_rows,
    }


def enforce_quality_gate(quality: Mapping[str, Any]) -> None:
    """Raise :class:`StepError` on the first violated gate field (all of them in the message)."""
    violations = (quality.get("gate") or {}).get("violations") or []
    if violations:
        raise StepError(
            "data quality gate failed: " + "; ".join(v["message"] for v in violations),
            field=violations[0]["field"],
        )


# --------------------------------------------------------------------------------------------
# HTML


def _chart_png(quality: Mapping[str, Any]) -> str:
    """Bar charts of the missing fraction per column and the class balance, base64 PNG."""
    from matplotlib.figure import Figure

    columns = sorted(quality["columns"], key=lambda c: -c["missing_before"])[:20]
    balance = quality["class_balance"].get("after", {}).get("train", {})
    figure = Figure(figsize=(9, 3.2), dpi=80)
    axes = figure.subplots(1, 2 if balance else 1, squeeze=False)[0]
    axes[0].barh(
        [c["name"][:24] for c in columns][::-1], [c["missing_before"] for c in columns][::-1]
    )
    axes[0].set_xlabel("missing fraction before cleaning")
    axes[0].tick_params(axis="y", labelsize=7)
    if balance:
        axes[1].bar(list(balance)[:30], list(balance.values())[:30], color="tab:orange")
        axes[1].set_title("class balance (train)")
        axes[1].tick_params(axis="x", labelsize=7, rotation=45)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def render_quality_html(quality: Mapping[str, Any]) -> str:
    """A self-contained HTML page (inline CSS, embedded PNG) of the data-quality report."""
    esc = html.escape
    rows = quality["rows"]
    gate = quality.get("gate") or {}
    gate_text = (
        "not configured"
        if not gate.get("enabled")
        else "passed"
        if gate.get("passed")
        else "FAILED: " + "; ".join(v["message"] for v in gate["violations"])
    )
    summary = [
        ("source", quality.get("source", "")),
        ("rows before → after", f"{rows['before']['total']} → {rows['after']['total']}"),
        (
            "missing cells before → after",
            f"{quality['missing_fraction']['before']:.2%} → "
            f"{quality['missing_fraction']['after']:.2%} ({quality['missing_strategy']})",
        ),
        (
            "duplicates found / removed",
            f"{quality['duplicates']['found']} / {quality['duplicates']['removed']}",
        ),
        (
            "outliers found / rows dropped",
            f"{quality['outliers']['found']} / {quality['outliers']['rows_dropped']} "
            f"({quality['outliers']['method']}, {quality['outliers']['action']})",
        ),
        ("quality gate", gate_text),
    ]
    summary_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in summary)
    column_html = "".join(
        f"<tr><td>{esc(c['name'])}</td><td>{esc(c['kind'])}</td>"
        f"<td>{c['missing_before']:.2%}</td><td>{c['missing_after']:.2%}</td>"
        f"<td>{c['outliers']}</td></tr>"
        for c in quality["columns"]
    )
    balance = quality["class_balance"].get("after", {})
    balance_html = "".join(
        f"<tr><td>{esc(split)}</td><td>"
        + esc(", ".join(f"{label}: {count}" for label, count in counts.items()))
        + "</td></tr>"
        for split, counts in balance.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Data quality</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}"
        "</style></head><body><h1>Data quality</h1>"
        f"<table>{summary_html}</table>"
        "<img alt='missing values and class balance' "
        f"src='data:image/png;base64,{_chart_png(quality)}'>"
        + (f"<h2>Class balance</h2><table>{balance_html}</table>" if balance_html else "")
        + "<h2>Columns</h2><table><tr><th>column</th><th>kind</th><th>missing before</th>"
        f"<th>missing after</th><th>outliers (train)</th></tr>{column_html}</table>"
        "</body></html>\n"
    )
