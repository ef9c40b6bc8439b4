"""Everything a resource's spec is refused for, in full: the pure rules of
``planning.spec_rules``, plus what needs a look outside the spec (a data file's real path
through symlinks, a DriftPolicy's features in the signature its deployment serves).

The admission webhook answers with these; the daemons run them again at reconcile.
"""

from __future__ import annotations

from kubeloop import reasons
from kubeloop.api.drift_policy import DriftPolicy
from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.api.model_version import ModelVersion
from kubeloop.api.training_run import TrainingRun
from kubeloop.backends.kube import MODEL_DEPLOYMENTS, MODEL_VERSIONS, NotFound
from kubeloop.backends.tenancy import link_escape
from kubeloop.handlers.startup import Context
from kubeloop.planning import drift_signals, spec_rules
from kubeloop.planning.spec_rules import Refusal


def training_run(ctx: Context, tr: TrainingRun) -> list[Refusal]:
    policy = ctx.tenancy
    out = spec_rules.training_run(tr.spec, tr.namespace, policy)
    if out:
        return out
    allowed = policy.data_prefixes(tr.namespace)
    for where, uri in spec_rules.data_sources(tr.spec):
        why = link_escape(uri, where, allowed)
        if why:
            out.append(Refusal(spec_rules.DATA_OUTSIDE_TENANT, why))
    return out


def model_version(ctx: Context, mv: ModelVersion) -> list[Refusal]:
    policy = ctx.tenancy
    out = spec_rules.model_version(mv.spec, mv.namespace, policy)
    if out:
        return out
    why = link_escape(
        mv.spec.artifact.uri, "spec.artifact.uri", policy.tenant_prefixes(mv.namespace)
    )
    return [Refusal(reasons.ARTIFACT_OUTSIDE_TENANT, why)] if why else []


def model_deployment(md: ModelDeployment) -> list[Refusal]:
    return spec_rules.model_deployment(md.spec, md.namespace)


async def drift_policy(ctx: Context, policy: DriftPolicy, *, served: bool) -> list[Refusal]:
    """``served``: also check the signals against the signature the target serves now (the
    webhook; the daemon checks that itself, with the version it evaluates)."""
    out = spec_rules.drift_policy(policy.spec, policy.namespace)
    if out or not served:
        return out
    try:
        md = ModelDeployment.parse(
            await ctx.kube.get(MODEL_DEPLOYMENTS, policy.namespace, policy.spec.target.name)
        )
        stable = md.status.stable.model_version
        if not stable:
            return out
        mv = ModelVersion.parse(await ctx.kube.get(MODEL_VERSIONS, policy.namespace, stable))
    except NotFound:  # not deployed yet: the daemon checks once it is
        return out
    baseline = drift_signals.Baseline.of(mv)
    for reason, message in drift_signals.problems(policy.spec.signals, baseline):
        if reason == reasons.INVALID_SPEC:  # a missing reference may come with a new version
            out.append(Refusal(reason, message))
    return out
