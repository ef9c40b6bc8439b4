"""The registry's decisions: artifact policy, alias ownership, status, the model index.

A version's identity is its name (``<model>-v<version>``), so the API server itself refuses a
second registration of the same version.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeloop import API_VERSION, reasons
from kubeloop.api.model_version import ModelVersion, ModelVersionStatus
from kubeloop.planning.conditions import set_condition
from kubeloop.planning.naming import registry_index_name

PRIMARY_METRICS = ("f1", "accuracy", "roc_auc", "r2", "mse", "mae")


@dataclass(frozen=True)
class VersionEntry:
    """What the registry index keeps of each version (from the watch stream)."""

    name: str
    uid: str
    resource_version: str
    version: int
    uri: str
    aliases: tuple[str, ...]
    metrics: tuple[tuple[str, float], ...]
    deleting: bool = False

    @classmethod
    def from_version(cls, mv: ModelVersion) -> VersionEntry:
        meta = mv.metadata
        return cls(
            name=meta.name,
            uid=meta.uid,
            resource_version=meta.resource_version,
            version=mv.spec.version,
            uri=mv.spec.artifact.uri,
            aliases=tuple(mv.spec.aliases),
            metrics=tuple(sorted(mv.spec.metrics.items())),
            deleting=bool(meta.deletion_timestamp),
        )

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> VersionEntry:
        meta, spec = body["metadata"], body.get("spec", {})
        return cls(
            name=meta["name"],
            uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""),
            version=int(spec.get("version", 0)),
            uri=spec.get("artifact", {}).get("uri", ""),
            aliases=tuple(spec.get("aliases", [])),
            metrics=tuple(sorted(spec.get("metrics", {}).items())),
            deleting=bool(meta.get("deletionTimestamp")),
        )


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


def expected_name(model_name: str, version: int) -> str:
    return f"{model_name}-v{version}"


def identity_problem(mv: ModelVersion) -> Problem | None:
    """A version's identity is its name, so the API server itself refuses registering the
    same version twice. (Checked here: a CEL rule comparing metadata.name with spec fields
    exceeds the API server's cost budget, as metadata.name counts as unbounded.)"""
    wanted = expected_name(mv.spec.model_name, mv.spec.version)
    if mv.name != wanted:
        return Problem(
            reasons.INVALID_NAME,
            f"metadata.name {mv.name!r} must be {wanted!r} (<spec.modelName>-v<spec.version>): "
            "one object per model version",
            retry=False,
        )
    return None


def artifact_problem(mv: ModelVersion, seen: ArtifactObservation) -> Problem | None:
    """Existence and digest of the artifact, where the operator could look."""
    uri = mv.spec.artifact.uri
    if seen.exists is False:
        return Problem(
            reasons.ARTIFACT_NOT_FOUND,
            f"spec.artifact.uri {uri!r}: {seen.detail or 'not found'}",
            retry=True,
        )
    wanted = mv.spec.artifact.sha256
    if wanted and seen.sha256 and wanted != seen.sha256:
        return Problem(
            reasons.ARTIFACT_DIGEST_MISMATCH,
            f"spec.artifact.sha256 is {wanted} but the artifact at {uri} hashes to {seen.sha256}",
            retry=False,
        )
    return None


def alias_removals(claimant: ModelVersion, others: Iterable[VersionEntry]) -> dict[str, list[str]]:
    """Aliases other versions must give up because ``claimant`` claims them.

    Called under the per-model lock with the claimant read fresh, so the last claim processed
    wins and exactly one holder remains whatever the interleaving of concurrent updates
    (removals are guarded by the holder's resourceVersion).
    """
    removals: dict[str, list[str]] = {}
    for entry in others:
        if entry.name == claimant.name:
            continue
        lost = [str(a) for a in entry.aliases if a in claimant.spec.aliases]
        if lost:
            removals[entry.name] = lost
    return removals


def primary_metric(metrics: Mapping[str, float]) -> str:
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
    now: dt.datetime,
) -> VersionPlan:
    """Status of one ModelVersion given what was observed."""
    gen = mv.metadata.generation
    status = mv.status.model_copy(deep=True)
    status.observed_generation = gen
    status.primary_metric = primary_metric(mv.spec.metrics)
    problem = identity_problem(mv) or policy or artifact_problem(mv, artifact)
    conds = status.conditions
    if problem is not None:
        status.phase = "Pending" if problem.retry else "Failed"
        status.aliases = []
        status.artifact_verified = False
        conds = set_condition(
            conds, reasons.READY, "False", problem.reason, problem.message, generation=gen, now=now
        )
        conds = set_condition(
            conds,
            reasons.DEGRADED,
            "True",
            problem.reason,
            problem.message,
            generation=gen,
            now=now,
        )
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
    conds = set_condition(
        conds, reasons.DEGRADED, "False", reasons.RECONCILED, "", generation=gen, now=now
    )
    status.conditions = conds
    # Becoming Ready is routine (the Ready condition says it; a TrainingRun posts its own
    # Registered Event): an Event would be one more write per version. Alias moves change what
    # is served, and are told.
    events = []
    gained = sorted(set(status.aliases) - set(mv.status.aliases))
    if gained:
        events.append(
            (
                "Normal",
                reasons.ALIAS_CLAIMED,
                f"now holds {', '.join(gained)} for {mv.spec.model_name}",
            )
        )
    return VersionPlan(status, None, events)


def build_registry_index(
    model_name: str, namespace: str, versions: Iterable[VersionEntry]
) -> dict[str, Any]:
    """The ConfigMap indexing a model's versions and alias holders (owned by every version,
    so garbage collection removes it with the last one)."""
    ordered = sorted((v for v in versions if not v.deleting), key=lambda v: (v.version, v.name))
    aliases = {a: v.name for v in ordered for a in v.aliases}
    index = {
        "model": model_name,
        "aliases": dict(sorted(aliases.items())),
        "versions": [
            {
                "name": v.name,
                "version": v.version,
                "uri": v.uri,
                "aliases": list(v.aliases),
                "metrics": dict(v.metrics),
            }
            for v in ordered
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": registry_index_name(model_name),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "kubeloop",
                "kubeloop.dev/model-name": model_name,
            },
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "ModelVersion",
                    "name": v.name,
                    "uid": v.uid,
                    "controller": False,
                    "blockOwnerDeletion": False,
                }
                for v in ordered
                if v.uid
            ],
        },
        "data": {"index.json": json.dumps(index, indent=2, sort_keys=True)},
    }
