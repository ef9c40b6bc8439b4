"""One DriftPolicy window read from Prometheus: the serving runtime's bucket and feedback
counters of the deployment's stable version, and the tenant's scoped queries.

A few queries whatever the number of features (one ``sum by (feature, bucket)``). What cannot
be had is left out, so the signal is *inconclusive*: an unreachable Prometheus (``problem``),
an empty series, a NaN. A tenant query that is invalid or reaches another namespace raises
:class:`InvalidSignal` naming the field: the policy is refused, not silently inconclusive.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubeloop.api.drift_policy import CONCEPT_SIGNALS, FEATURE_SIGNALS, Signal
from kubeloop.backends.prometheus import (
    AmbiguousQuery,
    InvalidQuery,
    PrometheusClient,
    PrometheusUnavailable,
)
from kubeloop.contract import serving_metrics as metrics
from kubeloop.planning import feedback_queries
from kubeloop.planning.drift_signals import Baseline, Window, bucket_counts
from kubeloop.planning.promql import UnsafeQuery, quote_label_value, scope_query


class InvalidSignal(ValueError):
    """A signal's query cannot be evaluated; the message names the field."""


def signal_queries(
    signals: Sequence[Signal], namespace: str, model: str, version: str, window: str
) -> dict[str, str]:
    """The scoped PromQL of every signal's inputs, by key: ``features``, ``predictions``,
    ``<concept type>`` and ``<concept type>:rows``, ``custom:<signal name>``. Raises
    :class:`InvalidSignal` for a tenant query that is malformed or names another namespace."""
    sel = (
        f"{metrics.MODEL_LABEL}={quote_label_value(model)},"
        f"{metrics.VERSION_LABEL}={quote_label_value(version)}"
    )
    queries: dict[str, str] = {}
    types = {s.type for s in signals}
    if types & set(FEATURE_SIGNALS):
        series = f"{metrics.total(metrics.FEATURE_BUCKETS)}{{{sel}}}[{window}]"
        queries["features"] = scope_query(
            f"sum by ({metrics.FEATURE_LABEL}, {metrics.BUCKET_LABEL}) (increase({series}))",
            namespace,
        )
    if "prediction" in types:
        series = f"{metrics.total(metrics.PREDICTION_BUCKETS)}{{{sel}}}[{window}]"
        queries["predictions"] = scope_query(
            f"sum by ({metrics.BUCKET_LABEL}) (increase({series}))", namespace
        )
    builders = {
        "accuracy": feedback_queries.accuracy,
        "f1": feedback_queries.macro_f1,
        "mae": feedback_queries.mae,
        "rmse": feedback_queries.rmse,
    }
    for concept in sorted(types & set(CONCEPT_SIGNALS)):
        queries[concept] = builders[concept](namespace, model, version, window)
        queries[f"{concept}:rows"] = feedback_queries.labelled_rows(
            namespace, model, version, window
        )
    for i, s in enumerate(signals):
        if s.type != "promql" or s.query is None:
            continue
        try:
            queries[f"custom:{s.name}"] = scope_query(
                s.query, namespace, substitutions={"version": version}
            )
        except (UnsafeQuery, InvalidQuery) as exc:
            raise InvalidSignal(f"spec.signals[{i}].query ({s.name}): {exc}") from exc
    return queries


async def read_window(
    prom: PrometheusClient,
    signals: Sequence[Signal],
    baseline: Baseline,
    queries: dict[str, str],
) -> Window:
    """Run ``queries`` (from :func:`signal_queries`) and arrange the answers for
    ``planning.drift_signals.evaluate``."""
    try:
        features = None
        if "features" in queries:
            table = await prom.query_table(
                queries["features"], (metrics.FEATURE_LABEL, metrics.BUCKET_LABEL)
            )
            by_feature: dict[str, dict[str, float]] = {}
            for (feature, bucket), value in table.items():
                by_feature.setdefault(feature, {})[bucket] = value
            features = {
                name: bucket_counts(by_feature.get(name, {}), ref)
                for name, ref in baseline.features.items()
            }
        predictions = None
        if "predictions" in queries and baseline.prediction is not None:
            vector = await prom.query_vector(queries["predictions"], metrics.BUCKET_LABEL)
            predictions = bucket_counts(vector, baseline.prediction)
        concept: dict[str, tuple[float | None, float | None]] = {}
        for concept_type in CONCEPT_SIGNALS:
            if concept_type in queries:
                concept[concept_type] = (
                    await prom.query_value(queries[concept_type]),
                    await prom.query_value(queries[f"{concept_type}:rows"]),
                )
        custom: dict[str, float | None] = {}
        for s in signals:
            key = f"custom:{s.name}"
            if key in queries:
                try:
                    custom[s.name] = await prom.query_value(queries[key])
                except (InvalidQuery, AmbiguousQuery):
                    custom[s.name] = None  # judged inconclusive; the query itself parsed
    except PrometheusUnavailable as exc:
        return Window(problem=f"Prometheus unavailable: {exc}")
    return Window(features, predictions, concept, custom)
