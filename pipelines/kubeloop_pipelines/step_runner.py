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
4. for a *cached* step (ingest, preprocess with ``spec.caching``: given a data fingerprint),
   looks its key up in the run store's step cache (``step_cache``) first: a hit copies the
   outputs and published files instead of running the step and says ``cached: true`` in the
   record; a miss runs it and fills the entry. Its record also travels in its output
   directory, for the next step with a run URI to adopt (``carry_records``/``adopt_records``:
   on a Kubeflow cluster a cached step has no run URI, see compiler.py);
5. on ``StepError`` marks the record Failed with its message, field and permanence; on any
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
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

if TYPE_CHECKING:
    from kubeloop.api.training_run import TrainingRunSpec

from kubeloop.contract.steps import step_record
from kubeloop_pipelines.contract import StepError, StepResult, parse_spec
from kubeloop_pipelines.progress import StepReport, local_path, write_text
from kubeloop_pipelines.step_cache import (
    CACHED_OUTPUTS,
    CARRIED_RECORDS,
    CacheEntry,
    cache_entry,
    data_fingerprint,
    step_key,
)

# Where the step modules live; tests point it at stand-in steps (nothing else should).
STEPS_PACKAGE_ENV = "KUBELOOP_STEPS_PACKAGE"
STEPS_PACKAGE = "kubeloop_pipelines.steps"
TRACEBACK_LINES = 12
# A cached step gets no run_uri input (it would enter KFP's cache key): the local runner sets
# this variable in its process, which every task it starts inherits.
RUN_URI_ENV = "KUBELOOP_RUN_URI"
# Output paths named like this are directories the step fills; other paths are files.
DIRECTORY_SUFFIX = "_dir"
# The input directories that may carry the records of cached steps (see carry_records).
INPUT_DIRECTORIES = ("raw_dir", "prepared_dir")


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
    fingerprint: str = "",
) -> StepResult:
    """Run ``steps.<step>.run(spec, report=, run_uri=, **paths)`` as a pipeline task (see the
    module docstring). ``paths`` are the artifact paths, keyword names as the step expects;
    ``None`` passes through (an optional input that is absent). ``fingerprint`` (the data's,
    given to cached steps only) makes the step look in the step cache first."""
    run_uri = run_uri or os.environ.get(RUN_URI_ENV, "")
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
    key = step_key(step, spec_json, fingerprint) if fingerprint else ""
    entry = cache_entry(run_uri, step, key) if key else None
    extra: dict[str, Any] = {"cacheKey": key, "cached": False} if key else {}
    try:
        prepared = _prepare(paths)
        if not key:
            adopt_records(run_uri, prepared)
        result = _restore(entry, step, prepared, run_uri) if entry is not None else None
        if result is None:
            module = importlib.import_module(f"{steps_package()}.{step}")
            result = module.run(spec, report=report, run_uri=run_uri, **prepared)
            if entry is not None:
                entry.store(_outputs(step, prepared), _result_json(result), local_path(run_uri))
        else:
            extra["cached"] = True
        if step == "ingest":
            extra["data"] = _data_snapshot(spec, result, fingerprint)
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
        metrics=dict(result.metrics),
        outputs=dict(result.outputs),
        published=dict(result.published),
        **extra,
    )
    if key:
        carry_records(step, report.record, prepared)
    return result


def carry_records(
    step: str, record: Mapping[str, Any], prepared: Mapping[str, Path | None]
) -> None:
    """A cached step's record travels in its output directory (``CARRIED_RECORDS``), with
    those of the cached steps before it: on a Kubeflow cluster a cached step has no run URI to
    write to, and KFP may not run it at all, so the next step that has one adopts them."""
    outputs = [n for n in CACHED_OUTPUTS.get(step, ()) if n.endswith(DIRECTORY_SUFFIX)]
    target = prepared.get(outputs[0]) if outputs else None
    if target is None:
        return
    folder = target / CARRIED_RECORDS
    folder.mkdir(parents=True, exist_ok=True)
    for name in INPUT_DIRECTORIES:
        upstream = prepared.get(name)
        if upstream is not None and (upstream / CARRIED_RECORDS).is_dir():
            for carried in (upstream / CARRIED_RECORDS).glob("*.json"):
                (folder / carried.name).write_bytes(carried.read_bytes())
    (folder / f"{step}.json").write_text(json.dumps(record, default=float))


def adopt_records(run_uri: str, prepared: Mapping[str, Path | None]) -> None:
    """Write the carried records of the cached steps into the run directory where they are
    missing (the steps ran, or were reused by KFP, without a run URI); a record already there
    (the local runner gives cached steps the run URI) is left alone."""
    if not run_uri:
        return
    for name in INPUT_DIRECTORIES:
        folder = prepared.get(name)
        if folder is None or not (folder / CARRIED_RECORDS).is_dir():
            continue
        for carried in sorted((folder / CARRIED_RECORDS).glob("*.json")):
            if previous_record(run_uri, carried.stem):
                continue
            try:
                record = json.loads(carried.read_text())
                text = json.dumps({**record, "adopted": True}, default=float)
                write_text(run_uri, step_record(carried.stem), text)
            except (OSError, ValueError):
                continue  # progress is for people; the run goes on without it


def _outputs(step: str, prepared: Mapping[str, Path | None]) -> dict[str, Path | None]:
    return {name: prepared.get(name) for name in CACHED_OUTPUTS.get(step, ())}


def _result_json(result: StepResult) -> dict[str, Any]:
    return {
        "metrics": dict(result.metrics),
        "outputs": dict(result.outputs),
        "published": dict(result.published),
    }


def _restore(
    entry: CacheEntry, step: str, prepared: Mapping[str, Path | None], run_uri: str
) -> StepResult | None:
    """The cached result with its outputs copied into place; None on a miss (or an entry
    that cannot be read: then the step runs and rebuilds it)."""
    if not entry.complete:
        return None
    try:
        cached = entry.result()
        entry.restore(_outputs(step, prepared), local_path(run_uri))
    except (OSError, ValueError):
        return None
    return StepResult(
        metrics={str(k): float(v) for k, v in (cached.get("metrics") or {}).items()},
        outputs=dict(cached.get("outputs") or {}),
        published={str(k): str(v) for k, v in (cached.get("published") or {}).items()},
    )


def _data_snapshot(spec: TrainingRunSpec, result: StepResult, fingerprint: str) -> dict[str, Any]:
    """What the run trained on, for ``status.data``: the URI, the fingerprint, the rows."""
    if not fingerprint:  # not cached: no fingerprint task ran, hash the data here
        try:
            fingerprint = data_fingerprint(spec.data)
        except (OSError, ValueError, ImportError):
            fingerprint = ""
    return {
        "uri": spec.data.uri,
        "fingerprint": fingerprint,
        "rows": int(result.metrics.get("rows", 0)),
        "sources": 1 + len(spec.data.extra),
    }


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
