"""The rules a resource's spec must meet that a schema cannot express: one list of refusals
per kind, each naming the field.

The admission webhook (``handlers.webhook``) refuses a resource at ``kubectl apply`` with
these messages; every reconcile runs them again (defence in depth), so a cluster installed
without the webhook refuses the same spec as ``Ready=False`` with the same words. What the
models check when a body is parsed (bounds, durations of at least 1s, label keys, thresholds)
is refused by the parse, at both places, before these run. Checks that need the filesystem or
the registry (symlinks, a signal's feature in the served signature) sit beside them in
``handlers.refusals``; these are pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from croniter import croniter

from kubeloop import reasons
from kubeloop.api.drift_policy import DriftPolicySpec
from kubeloop.api.model_deployment import ModelDeploymentSpec
from kubeloop.api.model_version import ModelVersionSpec
from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.durations import seconds
from kubeloop.planning import tenancy
from kubeloop.planning.promql import InvalidQuery, UnsafeQuery, scope_query

DATA_OUTSIDE_TENANT = "DataOutsideTenantPrefix"
UNSAFE_QUERY = "UnsafeQuery"
# A version name stands in for {{version}} while a query is judged before any version exists.
_PROBE_VERSION = "probe-v1"


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str  # names the field, e.g. "spec.data.uri 'file:///etc/passwd' lies outside …"


def message(refusals: list[Refusal]) -> str:
    """All refusals in one line (what the webhook answers)."""
    return "; ".join(r.message for r in refusals)


def _query(query: str, namespace: str, where: str) -> list[Refusal]:
    try:
        scope_query(query, namespace, substitutions={"version": _PROBE_VERSION})
    except InvalidQuery as exc:
        return [Refusal(reasons.INVALID_SPEC, f"{where}: {exc}")]
    except UnsafeQuery as exc:
        return [Refusal(UNSAFE_QUERY, f"{where}: {exc}")]
    return []


def data_sources(spec: TrainingRunSpec) -> list[tuple[str, str]]:
    """Every data URI a run reads, with the field that names it."""
    sources = [("spec.data.uri", spec.data.uri)]
    return sources + [(f"spec.data.extra[{i}].uri", e.uri) for i, e in enumerate(spec.data.extra)]


def training_run(spec: TrainingRunSpec, namespace: str, policy: tenancy.Policy) -> list[Refusal]:
    out: list[Refusal] = []
    for where, uri in data_sources(spec):
        why = tenancy.data_uri_problem(uri, namespace, where, policy)
        if why:
            out.append(Refusal(DATA_OUTSIDE_TENANT, why))
    if spec.schedule and not croniter.is_valid(spec.schedule):
        out.append(
            Refusal(
                reasons.INVALID_SPEC,
                f"spec.schedule {spec.schedule!r} is not a valid cron expression "
                "(minute hour day-of-month month day-of-week, e.g. '0 3 * * *')",
            )
        )
    return out


def model_version(spec: ModelVersionSpec, namespace: str, policy: tenancy.Policy) -> list[Refusal]:
    why = tenancy.artifact_uri_problem(spec.artifact.uri, namespace, "spec.artifact.uri", policy)
    return [Refusal(reasons.ARTIFACT_OUTSIDE_TENANT, why)] if why else []


def model_deployment(spec: ModelDeploymentSpec, namespace: str) -> list[Refusal]:
    out: list[Refusal] = []
    for i, metric in enumerate(spec.rollout.analysis.metrics):
        out += _query(metric.query, namespace, f"spec.rollout.analysis.metrics[{i}].query")
    return out


def drift_policy(spec: DriftPolicySpec, namespace: str) -> list[Refusal]:
    out: list[Refusal] = []
    if seconds(spec.window) < seconds(spec.interval):
        out.append(
            Refusal(
                reasons.INVALID_SPEC,
                f"spec.window={spec.window!r} must be at least spec.interval={spec.interval!r}",
            )
        )
    for i, s in enumerate(spec.signals):
        if s.type == "promql" and s.query:
            out += _query(s.query, namespace, f"spec.signals[{i}].query")
    return out
