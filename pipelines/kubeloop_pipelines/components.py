"""The KFP v2 lightweight components, one per pipeline step.

KFP ships each function's *source* to the pod (or to ``kfp.local``'s subprocess) and runs it in
the training image, so every body imports what it needs inside the function and stays a thin
wrapper: :func:`kubeloop_pipelines.step_runner.run_step` keeps the progress record, calls the step,
logs the metrics and handles the errors. The image already holds kfp and kubeloop, hence
``install_kfp_package=False`` and no ``packages_to_install`` (which also keeps ``kfp.local``
offline).

The functions here are plain; :func:`step_components` turns them into components for an image.
Directory outputs are the ``*_dir`` arguments of the steps (see ``steps/__init__.py``).

``evaluate`` returns ``gates_passed`` as its plain ``bool`` output (KFP names it ``Output``), not
as a NamedTuple field: kfp.local 2.17 resolves only ``<task>-Output`` in a ``dsl.If`` condition
and silently evaluates a named output as false (the register step would never run locally).

No ``from __future__ import annotations`` in this module: KFP reads these annotations to build
the component interfaces, and the shipped source must define them as written.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

DEFAULT_IMAGE = "ghcr.io/kubeloop/training:0.1.0"


def fingerprint(*, spec_json: str) -> str:
    """Fingerprint the data: a content hash of every data source (``step_cache``). Never
    cached, so a change to the data reaches the cache keys of ingest and preprocess. A source
    that cannot be read gets a unique value: ingest then runs and says what is wrong."""
    import uuid

    from kubeloop_pipelines.contract import parse_spec
    from kubeloop_pipelines.step_cache import data_fingerprint

    try:
        return data_fingerprint(parse_spec(spec_json).data)
    except Exception as exc:
        print(f"data cannot be fingerprinted ({type(exc).__name__}: {exc}); not cached")
        return f"unreadable:{uuid.uuid4().hex}"


def ingest(
    *,
    spec_json: str,
    dataset: Output[Dataset],
    summary: Output[Markdown],
    run_uri: str = "",
    data_fingerprint: str = "",
) -> None:
    """Ingest: read the data source (file, object store or built-in dataset), keep the selected
    features and the target, and split the rows (seeded) into train/validation/test.

    Cached (``spec.caching``): ``spec_json`` is the data slice and ``data_fingerprint`` the
    data's content hash; no ``run_uri`` (the runner gives it as ``KUBELOOP_RUN_URI``)."""
    from kubeloop_pipelines.step_runner import run_step

    paths = {"dataset_dir": dataset.path}
    run_step("ingest", spec_json, run_uri, paths, summary=summary, fingerprint=data_fingerprint)


def preprocess(
    *,
    spec_json: str,
    raw: Input[Dataset],
    prepared: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
    run_uri: str = "",
    data_fingerprint: str = "",
) -> None:
    """Preprocess: clean (missing values, outliers, duplicates), check the data-quality gate,
    fit the encoders and scalers on the training split and write the prepared arrays.

    Cached like ingest: the data + preprocessing slice, the fingerprint, no ``run_uri``."""
    from kubeloop_pipelines.step_runner import run_step

    paths = {"raw_dir": raw.path, "prepared_dir": prepared.path, "report_html": report.path}
    run_step("preprocess", spec_json, run_uri, paths, metrics=metrics, fingerprint=data_fingerprint)


def tune(
    *,
    spec_json: str,
    run_uri: str,
    prepared: Input[Dataset],
    params: Output[Artifact],
    report: Output[HTML],
    metrics: Output[Metrics],
) -> None:
    """Tune: search the hyperparameters (trials on the validation split) and write the best."""
    from kubeloop_pipelines.step_runner import run_step

    paths = {"prepared_dir": prepared.path, "params_path": params.path, "report_html": report.path}
    run_step("tune", spec_json, run_uri, paths, metrics=metrics)


def train(
    *,
    spec_json: str,
    run_uri: str,
    prepared: Input[Dataset],
    model: Output[Model],
    curves: Output[HTML],
    metrics: Output[Metrics],
    params: Input[Artifact] | None = None,
) -> None:
    """Train: fit the model (with the tuned hyperparameters when tuning ran) and export the
    serving artifact; the learning curves go to an HTML page."""
    from kubeloop_pipelines.step_runner import run_step

    # Without tuning, a params file that does not exist: train uses the spec's hyperparameters.
    untuned = model.path.rstrip("/") + ".untuned-params.json"
    paths = {
        "prepared_dir": prepared.path,
        "params_path": params.path if params is not None else untuned,
        "model_dir": model.path,
        "curves_html": curves.path,
    }
    run_step("train", spec_json, run_uri, paths, metrics=metrics)


def optimize(
    *,
    spec_json: str,
    run_uri: str,
    prepared: Input[Dataset],
    model: Input[Model],
    optimized: Output[Model],
    report: Output[HTML],
    metrics: Output[Metrics],
) -> None:
    """Optimize: prune, quantise or distil the model; keep a variant only within the accuracy
    budget and when it is fast enough, else hand the trained model on."""
    from kubeloop_pipelines.step_runner import run_step

    paths = {
        "prepared_dir": prepared.path,
        "model_dir": model.path,
        "optimized_dir": optimized.path,
        "report_html": report.path,
    }
    run_step("optimize", spec_json, run_uri, paths, metrics=metrics)


def evaluate(
    *,
    spec_json: str,
    run_uri: str,
    prepared: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[HTML],
) -> bool:
    """Evaluate: test-split metrics, confusion matrix and ROC, serving cost, and the gates.
    Returns ``gates_passed``: the model is registered only when it is true."""
    from kubeloop_pipelines.step_runner import run_step

    paths = {
        "prepared_dir": prepared.path,
        "model_dir": model.path,
        "evaluation_path": evaluation.path,
        "report_html": report.path,
    }
    result = run_step(
        "evaluate", spec_json, run_uri, paths, metrics=metrics, classification=classification
    )
    return bool(result.outputs.get("gates_passed", False))


def explain(
    *,
    spec_json: str,
    run_uri: str,
    prepared: Input[Dataset],
    model: Input[Model],
    report: Output[HTML],
    metrics: Output[Metrics],
) -> None:
    """Explain: global feature importance and per-sample explanations, as plots."""
    from kubeloop_pipelines.step_runner import run_step

    paths = {"prepared_dir": prepared.path, "model_dir": model.path, "report_html": report.path}
    run_step("explain", spec_json, run_uri, paths, metrics=metrics)


def register(
    *,
    spec_json: str,
    run_uri: str,
    raw: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Artifact],
    manifest: Output[Artifact],
) -> None:
    """Register: write the ModelVersion manifest (model URI, metrics, lineage) that the
    operator applies."""
    from kubeloop_pipelines.step_runner import run_step

    paths = {
        "raw_dir": raw.path,
        "model_dir": model.path,
        "evaluation_path": evaluation.path,
        "manifest_path": manifest.path,
    }
    run_step("register", spec_json, run_uri, paths)


STEP_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "fingerprint": fingerprint,
    "ingest": ingest,
    "preprocess": preprocess,
    "tune": tune,
    "train": train,
    "optimize": optimize,
    "evaluate": evaluate,
    "explain": explain,
    "register": register,
}


@dataclass(frozen=True)
class StepComponents:
    """The components of every step, built for one image."""

    image: str
    fingerprint: Any
    ingest: Any
    preprocess: Any
    tune: Any
    train: Any
    optimize: Any
    evaluate: Any
    explain: Any
    register: Any


@functools.cache
def step_components(image: str = DEFAULT_IMAGE) -> StepComponents:
    """The components for ``image`` (built once per image: building reads the source)."""

    def build(func: Callable[..., Any]) -> Any:
        return dsl.component(func, base_image=image, install_kfp_package=False)

    return StepComponents(image, **{name: build(f) for name, f in STEP_FUNCTIONS.items()})
