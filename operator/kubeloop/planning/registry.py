"""The registry's rules that other kinds rely on: which version an alias (or a TrainingRun)
means, whether a version may replace another behind one endpoint, the next version number and
the body of a version registered by a TrainingRun. Pure: the registry index is an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeloop import API_VERSION, reasons
from kubeloop.api.model_deployment import ModelSource
from kubeloop.api.model_version import ModelVersion, ModelVersionSpec
from kubeloop.contract.labels import ATTEMPT_LABEL, TRAINING_RUN_LABEL
from kubeloop.planning.model_version import expected_name

LATEST = "latest"  # an alias nobody needs to claim: the highest Ready version holds it


@dataclass(frozen=True)
class Resolved:
    """The ModelVersion a reference points at, or why it points at none."""

    version: ModelVersion | None
    problem: str = ""
    reason: str = ""


def _ready(version: ModelVersion | None, name: str) -> Resolved:
    if version is None:
        return Resolved(None, f"ModelVersion {name!r} not found", reasons.MODEL_VERSION_NOT_FOUND)
    if version.status.phase != "Ready":
        return Resolved(
            None,
            f"ModelVersion {name!r} is not Ready ({version.status.phase})",
            reasons.MODEL_VERSION_NOT_READY,
        )
    return Resolved(version)


def by_name(versions: Iterable[ModelVersion], name: str) -> Resolved:
    """The Ready version called ``name``."""
    return _ready(next((v for v in versions if v.name == name), None), name)


def alias_holder(versions: Iterable[ModelVersion], model: str, alias: str) -> Resolved:
    """The Ready version of ``model`` that holds ``alias``; ``latest`` falls back to the
    highest Ready version when no version claims it."""
    ready = [v for v in versions if v.spec.model_name == model and v.status.phase == "Ready"]
    holders = [v for v in ready if alias in v.status.aliases]
    if holders:
        return Resolved(holders[0])
    if alias == LATEST and ready:
        return Resolved(max(ready, key=lambda v: v.spec.version))
    return Resolved(
        None,
        f"no ModelVersion of {model!r} holds alias {alias!r}",
        reasons.MODEL_VERSION_NOT_FOUND,
    )


def registered_by(
    versions: Iterable[ModelVersion], training_run: str, attempt: int | None = None
) -> list[ModelVersion]:
    """Versions a TrainingRun registered (of one attempt, when given), highest first."""
    found = [
        v
        for v in versions
        if v.metadata.labels.get(TRAINING_RUN_LABEL) == training_run
        and (attempt is None or v.metadata.labels.get(ATTEMPT_LABEL) == str(attempt))
    ]
    return sorted(found, key=lambda v: v.spec.version, reverse=True)


def incompatible(stable: ModelVersion | None, target: ModelVersion | None) -> str:
    """Why ``target`` cannot replace ``stable`` behind the same endpoint ('' if it can): the
    inputs (names and dtypes, in order) must stay the same, or clients' requests would break."""
    if stable is None or target is None or stable.name == target.name:
        return ""
    before, after = stable.spec.signature, target.spec.signature
    if before is None or after is None or not before.inputs or not after.inputs:
        return ""
    names_before = [(i.name, i.dtype) for i in before.inputs]
    names_after = [(i.name, i.dtype) for i in after.inputs]
    if names_before != names_after:
        return (
            f"{target.name}'s input signature ({len(names_after)} inputs) differs from "
            f"{stable.name}'s ({len(names_before)} inputs): requests would break"
        )
    return ""


def shared_prediction_edges(versions: Iterable[ModelVersion], model: str) -> tuple[float, ...]:
    """The prediction-histogram edges every version of a regression ``model`` is bucketed on:
    the first version's reference edges, carried forward, so stable, canary and reference
    compare like with like. Classifiers need none (the runtime buckets scores on fixed edges)."""
    ordered = sorted(
        (v for v in versions if v.spec.model_name == model and v.spec.task == "regression"),
        key=lambda v: v.spec.version,
    )
    for version in ordered:
        reference = version.spec.prediction_reference
        if reference is not None and len(reference.edges) >= 2:
            return tuple(reference.edges)
    return ()


def next_version(versions: Iterable[int], *, after: int = 0) -> int:
    """The next free version number: one above the highest known (and above ``after``, a
    number just refused as taken)."""
    return 1 + max([*versions, after], default=0)


def build_registered_version(
    manifest: Mapping[str, Any],
    *,
    model: str,
    version: int,
    namespace: str,
    training_run: str,
    attempt: int,
    run_id: str,
    spec_hash: str,
    labels: Mapping[str, str],
    parent_version: str | None = None,
) -> dict[str, Any]:
    """The ModelVersion a TrainingRun's attempt registers, from the register step's manifest.

    Labelled with the run and attempt so a restarted operator finds it instead of adding one;
    ``parent_version`` (the run's ``spec.registration.parentVersion``: the version it
    retrains) becomes ``lineage.parentVersion``. The manifest is validated here (a bad one
    raises pydantic's ValidationError naming the field)."""
    spec = dict(manifest.get("spec") or {})
    spec.update(modelName=model, version=version)
    lineage = dict(spec.get("lineage") or {})
    lineage.update(trainingRun=training_run, pipelineRunId=run_id, specHash=spec_hash)
    if parent_version:
        lineage["parentVersion"] = parent_version
    spec["lineage"] = lineage
    ModelVersionSpec.model_validate(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelVersion",
        "metadata": {
            "name": expected_name(model, version),
            "namespace": namespace,
            "labels": {**labels, TRAINING_RUN_LABEL: training_run, ATTEMPT_LABEL: str(attempt)},
        },
        "spec": spec,
    }


def resolve_source(
    source: ModelSource, versions: Iterable[ModelVersion], *, run_registered: str | None
) -> Resolved:
    """The version a ModelDeployment's ``spec.model`` means: a ModelVersion by name, the holder
    of an alias, or what a TrainingRun registered last (``run_registered``: its
    ``status.modelVersion``; None when the TrainingRun does not exist)."""
    versions = list(versions)
    if source.model_version is not None:
        return by_name(versions, source.model_version.name)
    if source.alias is not None:
        return alias_holder(versions, source.alias.model_name, source.alias.alias)
    assert source.training_run is not None  # the CRD requires exactly one source
    run = source.training_run.name
    if run_registered is None:
        return Resolved(
            None, f"spec.model.trainingRun {run!r} not found", reasons.MODEL_VERSION_NOT_FOUND
        )
    if not run_registered:
        return Resolved(
            None,
            f"TrainingRun {run!r} has not registered a model yet",
            reasons.MODEL_VERSION_NOT_FOUND,
        )
    return by_name(versions, run_registered)
