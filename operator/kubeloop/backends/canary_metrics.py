"""The canary's measurements, read from Prometheus, for ``planning.canary.judge``.

Every value that cannot be had — an empty or NaN series, an unreachable Prometheus, a tenant
query that is invalid or would read another namespace — is None, i.e. *inconclusive*: the
rollout holds its step and never promotes on missing data.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from kubeloop import reasons
from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.backends.prometheus import (
    AmbiguousQuery,
    InvalidQuery,
    PrometheusClient,
    PrometheusUnavailable,
)
from kubeloop.contract.durations import parse_rfc3339, seconds
from kubeloop.planning import canary
from kubeloop.planning import feedback_queries as fq
from kubeloop.planning.promql import UnsafeQuery, builtin_queries, scope_query


@dataclass
class Measured:
    values: canary.Measurements
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)


async def measure(
    prom: PrometheusClient,
    md: ModelDeployment,
    *,
    stable: str,
    candidate: str,
    now: dt.datetime,
    task: Literal["classification", "regression"] | None = None,
) -> Measured:
    """The canary's measurements; ``task`` (the versions' ModelVersion ``spec.task``; None:
    unknown) picks accuracy or MAE for ``analysis.maxAccuracyDrop``."""
    ns, window = md.namespace, md.spec.rollout.interval
    mine = builtin_queries(ns, md.name, candidate, window)
    # The stable's predictions are the baseline; at the last steps it gets little or no
    # traffic, so compare with everything it answered since the rollout began.
    began = parse_rfc3339(md.status.rollout_started_at)
    since = (now - began).total_seconds() if began else 0.0
    baseline = f"{int(seconds(window) + since)}s"
    theirs = builtin_queries(ns, md.name, stable, baseline)
    try:
        requests = await prom.query_value(mine["requests"])
        error_rate = await prom.query_value(mine["error_rate"])
        p99 = await prom.query_value(mine["p99_latency_ms"])
        shift = canary.psi(
            await prom.query_vector(theirs["prediction_fractions"]),
            await prom.query_vector(mine["prediction_fractions"]),
        )
        labelled = None
        if md.spec.rollout.analysis.max_accuracy_drop is not None and task is not None:
            labelled = await _labelled_quality(
                prom, md, task, stable=stable, candidate=candidate, window=baseline
            )
    except PrometheusUnavailable as exc:
        return Measured(
            canary.Measurements(),
            [(reasons.PROMETHEUS_UNAVAILABLE, f"analysis inconclusive: {exc}")],
        )
    warnings: list[tuple[str, str]] = []
    custom: dict[str, float | None] = {}
    for i, metric in enumerate(md.spec.rollout.analysis.metrics):
        try:
            query = scope_query(metric.query, ns, substitutions={"version": candidate})
            custom[metric.name] = await prom.query_value(query)
        except (UnsafeQuery, InvalidQuery, AmbiguousQuery) as exc:
            custom[metric.name] = None
            warnings.append(
                (
                    reasons.INVALID_SPEC,
                    f"spec.rollout.analysis.metrics[{i}].query ({metric.name}): {exc}",
                )
            )
        except PrometheusUnavailable as exc:
            custom[metric.name] = None
            warnings.append((reasons.PROMETHEUS_UNAVAILABLE, str(exc)))
    values = canary.Measurements(requests, error_rate, p99, shift, custom, labelled)
    return Measured(values, warnings)


async def _labelled_quality(
    prom: PrometheusClient,
    md: ModelDeployment,
    task: Literal["classification", "regression"],
    *,
    stable: str,
    candidate: str,
    window: str,
) -> canary.LabelledQuality:
    """Accuracy or MAE of both versions over the same window: the rollout so far, since labels
    arrive late and a canary at a low weight gathers few of them in one interval."""
    quality = fq.accuracy if task == "classification" else fq.mae

    async def of(version: str) -> tuple[float | None, float | None]:
        args = (md.namespace, md.name, version, window)
        value = await prom.query_value(quality(*args))
        return value, await prom.query_value(fq.labelled_rows(*args))

    (mine, my_rows), (theirs, their_rows) = await of(candidate), await of(stable)
    return canary.LabelledQuality(task, mine, theirs, my_rows, their_rows)
