"""The step runner: what every KFP component body does around its step, in one place.

A component (``components.py``) is a few lines: it hands its artifact paths to
:func:`run_step`, which

1. parses the spec JSON (``contract.parse_spec``) and opens the step's progress record
   (``progress.StepReport``); a retry of a step whose previous try failed *permanently* (a
   ``StepError(permanent=True)``: wrong input, not a flaky node) fails again at once instead of
   redoing the work, since neither KFP nor ``kfp.local`` can be told not to retry it;
2. creates the output directories and calls ``kubeloop_pipelines.steps.<step>.run(...)``;
3. logs the returned :class:`~kubeloop_pipelines.contract.StepResult` into KFP's ``Metrics`` /
   ``ClassificationMetrics`` artifacts (and a Markdown summary where the component has one) and
   marks the record Succeeded;
4. on ``StepError`` marks the record Failed with its message, field and permanence; on any
   other exception with the exception and the tail of its traceback (not permanent: a retry
   may heal it); then re-raises, so the task fails in KFP too.

This module is imported inside the component bodies (KFP ships only the function source to the
pod), so it must stay importable from the training image: no operator-only imports here
(``kubeloop.contract`` is shared by both sides and needs neither kopf nor aiohttp).
"""

from __future__ import annotations

import importlib
import json
import os
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from kubeloop.contract.steps import step_record
from kubeloop_pipelines.contract import StepError, StepResult, parse_spec
from kubeloop_pipelines.progress import StepReport, local_path

# Where the step modules live; tests point it at stand-in steps (nothing else should).
STEPS_PACKAGE_ENV = "KUBELOOP_STEPS_PACKAGE"
STEPS_PACKAGE = "kubeloop_pipelines.steps"
TRACEBACK_LINES = 12
# Output paths named like this are directories the step fills; other paths are files.
DIRECTORY_SUFFIX = "_dir"


class MetricsLog(Protocol):
    """What ``kfp.dsl.Metrics`` offers (kept structural: this module does not import kfp)."""

    def log_metric(self, metric: str, value: float) -> None: ...


class ClassificationLog(Protocol):
    """What ``kfp.dsl.ClassificationMetrics`` offers."""

    def log_confusion_matrix(self, categories: list[str], matrix: list[list[int]]) -> None: ...

    def log_roc_curve(self, fpr: list[float], tpr: list[float], threshold: list[float]) -> None: ...


class HasPath(Protocol):
    path: str


def steps_package() -> str:
    return os.environ.get(STEPS_PACKAGE_ENV) or STEPS_PACKAGE


def previous_record(run_uri: str, step: str) -> dict[str, Any]:
    """The step's progress record left by an earlier try of this run, or {}."""
    if not run_uri:
        return {}
    name = step_record(step)
    try:
        root = local_path(run_uri)
        if root is not None:
            text = (root / name).read_text()
        else:
            import fsspec

            with fsspec.open(f"{run_uri.rstrip('/')}/{name}", "r") as fh:
                text = fh.read()
        record = json.loads(text)
    except (OSError, ValueError, ImportError):
        return {}
    return record if isinstance(record, dict) else {}


def _prepare(paths: Mapping[str, str | None]) -> dict[str, Path | None]:
    prepared: dict[str, Path | None] = {}
    for name, value in paths.items():
        if value is None:
            prepared[name] = None
            continue
        path = Path(value)
        if name.endswith(DIRECTORY_SUFFIX) and not path.exists():
            # Output directories (inputs exist already); KFP only makes the parent.
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        prepared[name] = path
    return prepared


def _failure_message(exc: BaseException) -> str:
    tail = traceback.format_exception(exc)
    lines = "".join(tail).rstrip().splitlines()[-TRACEBACK_LINES:]
    return f"{type(exc).__name__}: {exc}\n" + "\n".join(lines)


def run_step(
    step: str,
    spec_json: str,
    run_uri: str,
    paths: Mapping[str, str | None],
    *,
    metrics: MetricsLog | None = None,
    classification: ClassificationLog | None = None,
    summary: HasPath | None = None,
) -> StepResult:
    """Run ``steps.<step>.run(spec, report=, run_uri=, **paths)`` as a pipeline task (see the
    module docstring). ``paths`` are the artifact paths, keyword names as the step expects;
    ``None`` passes through (an optional input that is absent)."""
    report = StepReport(run_uri, step)
    before = previous_record(run_uri, step)
    report.record["tries"] = int(before.get("tries", 0) or 0)
    if before.get("state") == "Failed" and before.get("permanent"):
        # Same run, same inputs: a permanent failure would only repeat. Fail fast, say so.
        report.started()
        message = str(before.get("message") or f"{step} failed")
        report.failed(message, field=str(before.get("field") or ""), permanent=True)
        raise StepError(f"{message} (not retried: permanent)", field=str(before.get("field") or ""))
    report.started()
    try:
        spec = parse_spec(spec_json)
    except ValidationError as exc:  # the spec itself is wrong: no retry heals that
        report.failed(f"invalid spec: {exc}", permanent=True)
        raise
    try:
        module = importlib.import_module(f"{steps_package()}.{step}")
        result: StepResult = module.run(spec, report=report, run_uri=run_uri, **_prepare(paths))
        _log(result, metrics, classification)
        if summary is not None:
            Path(summary.path).parent.mkdir(parents=True, exist_ok=True)
            Path(summary.path).write_text(markdown_summary(step, result))
    except StepError as exc:
        report.failed(exc.message, field=exc.field, permanent=exc.permanent)
        raise
    except Exception as exc:
        report.failed(_failure_message(exc), permanent=False)
        raise
    report.succeeded(
        metrics=dict(result.metrics), outputs=dict(result.outputs), published=dict(result.published)
    )
    return result


def _log(
    result: StepResult, metrics: MetricsLog | None, classification: ClassificationLog | None
) -> None:
    if metrics is not None:
        for name, value in sorted(result.metrics.items()):
            metrics.log_metric(name, float(value))
    if classification is None:
        return
    if result.confusion is not None:
        labels, matrix = result.confusion
        classification.log_confusion_matrix([str(x) for x in labels], matrix)
    if result.roc is not None:
        fpr, tpr, thresholds = result.roc
        classification.log_roc_curve(list(fpr), list(tpr), list(thresholds))


def markdown_summary(step: str, result: StepResult) -> str:
    """A short Markdown page for KFP's UI: the step's metrics and outputs."""
    lines = [f"# {step}", ""]
    if result.metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(result.metrics.items())]
        lines.append("")
    for key, value in sorted(result.outputs.items()):
        lines.append(f"- **{key}**: `{json.dumps(value, default=str)}`")
    for key, value in sorted(result.published.items()):
        lines.append(f"- {key}: `{value}`")
    return "\n".join(lines).rstrip() + "\n"
