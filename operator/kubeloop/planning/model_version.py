"""The registry's decisions: artifact policy, alias ownership, duplicate versions, status."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kubeloop import reasons
from kubeloop.api.model_version import Alias, ModelVersion, ModelVersionStatus
from kubeloop.planning.conditions import set_condition
from kubeloop.planning.naming import registry_index_name

PRIMARY_METRICS = ("f1", "accuracy", "roc_auc", "r2", "mse", "mae")


@dataclass(frozen=True)
class ArtifactObservation:
    """What the backends found at the artifact URI (None: could not look)."""

    exists: bool | None = None
    sha256: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str
    retry: bool  # True: may heal by itself (retry later); False: needs a spec change


def artifact_policy_problem(uri: str, namespace: str, *, artifact_root: str,
                            object_store_prefix: str) -> Problem | None:
    """Tenancy rule: artifacts live under a per-namespace prefix."""
    if uri.startswith("file://"):
        path = PurePosixPath(uri.removeprefix("file://"))
        root = PurePosixPath(artifact_root) / namespace
        if ".." in path.parts or not path.is_relative_to(root):
            return Problem(reasons.ARTIFACT_OUTSIDE_TENANT,
                           f"spec.artifact.uri {uri!r} must lie under file://{root}/ "
                           "(each namespace owns its own artifact prefix)", retry=False)
    elif uri.startswith(("s3://", "gs://")) and object_store_prefix:
        scheme = uri.split("://", 1)[0]
        prefix = object_store_prefix.split("://", 1)[-1].rstrip("/")
        wanted = f"{scheme}://{prefix}/{namespace}/"
        if not uri.startswith(wanted):
            return Problem(reasons.ARTIFACT_OUTSIDE_TENANT,
                           f"spec.artifact.uri {uri!r} must lie under {wanted}", retry=False)
    return None


def artifact_problem(mv: ModelVersion, seen: ArtifactObservation) -> Problem | None:
    """Existence and digest of the artifact, where the operator could look."""
    uri = mv.spec.artifact.uri
    if seen.exists is False:
        return Problem(reasons.ARTIFACT_NOT_FOUND,
                       f"spec.artifact.uri {uri!r}: {seen.detail or 'not found'}", retry=True)
    wanted = mv.spec.artifact.sha256
    if wanted and seen.sha256 and wanted != seen.sha256:
        return Problem(reasons.ARTIFACT_DIGEST_MISMATCH,
                       f"spec.artifact.sha256 is {wanted} but the artifact at {uri} hashes to "
                       f"{seen.sha256}", retry=False)
    return None


def _created(mv: ModelVersion) -> tuple[str, str]:
    return (mv.metadata.creation_timestamp or "", mv.name)


def duplicate_of(mv: ModelVersion, siblings: list[ModelVersion]) -> ModelVersion | None:
    """An older ModelVersion with the same model name and version number, if any."""
    older = [s for s in siblings if s.name != mv.name and s.spec.version == mv.spec.version
             and _created(s) < _created(mv)]
    return min(older, key=_created) if older else None


def alias_removals(claimant: ModelVersion, siblings: list[ModelVersion]) -> dict[str, list[Alias]]:
    """Aliases other versions must give up because ``claimant`` claims them.

    Called under the per-model lock with fresh objects, so the last claim processed wins and
    exactly one holder remains whatever the interleaving of concurrent updates.
    """
    removals: dict[str, list[Alias]] = {}
    for sibling in siblings:
        if sibling.name == claimant.name:
            continue
        lost = [a for a in sibling.spec.aliases if a in claimant.spec.aliases]
        if lost:
            removals[sibling.name] = lost
    return removals


def primary_metric(metrics: dict[str, float]) -> str:
    for name in PRIMARY_METRICS:
        if name in metrics:
            return f"{name}={metrics[name]:.4g}"
    if metrics:
        name = sorted(metrics)[0]
        return f"{name}={metrics[name]:.4g}"
    return ""


@dataclass
class VersionPlan:
    status: ModelVersionStatus
    problem: Problem | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def plan_model_version(
    mv: ModelVersion,
    *,
    policy: Problem | None,
    artifact: ArtifactObservation,
    duplicate: ModelVersion | None,
    now: dt.datetime,
) -> VersionPlan:
    """Status of one ModelVersion given what was observed."""
    gen = mv.metadata.generation
    status = mv.status.model_copy(deep=True)
    status.observed_generation = gen
    status.primary_metric = primary_metric(mv.spec.metrics)
    problem = policy or artifact_problem(mv, artifact)
    if problem is None and duplicate is not None:
        problem = Problem(reasons.DUPLICATE_VERSION,
                          f"spec.version {mv.spec.version} of model {mv.spec.model_name!r} is "
                          f"already registered as ModelVersion {duplicate.name!r}", retry=False)
    conds = status.conditions
    if problem is not None:
        status.phase = "Pending" if problem.retry else "Failed"
        status.aliases = []
        status.artifact_verified = False
        conds = set_condition(conds, reasons.READY, "False", problem.reason, problem.message,
                              generation=gen, now=now)
        conds = set_condition(conds, reasons.DEGRADED, "True", problem.reason, problem.message,
                              generation=gen, now=now)
        status.conditions = conds
        return VersionPlan(status, problem, [("Warning", problem.reason, problem.message)])

    verified = artifact.exists is True
    status.phase = "Ready"
    status.aliases = list(mv.spec.aliases)
    status.artifact_verified = verified
    if verified:
        reason, message = reasons.REGISTERED, f"artifact verified at {mv.spec.artifact.uri}"
    else:
        reason = reasons.ARTIFACT_UNVERIFIED
        message = f"registered; {mv.spec.artifact.uri} is not readable from the operator"
    conds = set_condition(conds, reasons.READY, "True", reason, message, generation=gen, now=now)
    conds = set_condition(conds, reasons.DEGRADED, "False", reasons.RECONCILED, "",
                          generation=gen, now=now)
    status.conditions = conds
    events = []
    if mv.status.phase != "Ready":
        events.append(("Normal", reasons.REGISTERED,
                       f"{mv.spec.model_name} v{mv.spec.version} registered ({message})"))
    gained = sorted(set(status.aliases) - set(mv.status.aliases))
    if gained:
        events.append(("Normal", reasons.ALIAS_CLAIMED,
                       f"now holds {', '.join(gained)} for {mv.spec.model_name}"))
    return VersionPlan(status, None, events)


def build_registry_index(model_name: str, namespace: str,
                         versions: list[ModelVersion]) -> dict[str, Any]:
    """The ConfigMap indexing a model's versions and alias holders (owned by every version,
    so garbage collection removes it with the last one)."""
    ordered = sorted(versions, key=lambda v: (v.spec.version, v.name))
    aliases = {a: v.name for v in ordered for a in v.spec.aliases}
    index = {
        "model": model_name,
        "aliases": dict(sorted(aliases.items())),
        "versions": [
            {"name": v.name, "version": v.spec.version, "uri": v.spec.artifact.uri,
             "aliases": list(v.spec.aliases), "metrics": v.spec.metrics}
            for v in ordered
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": registry_index_name(model_name),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "kubeloop",
                       "kubeloop.dev/model-name": model_name},
            "ownerReferences": [
                {"apiVersion": "kubeloop.dev/v1alpha1", "kind": "ModelVersion",
                 "name": v.name, "uid": v.metadata.uid, "controller": False,
                 "blockOwnerDeletion": False}
                for v in ordered if v.metadata.uid
            ],
        },
        "data": {"index.json": json.dumps(index, indent=2, sort_keys=True)},
    }
