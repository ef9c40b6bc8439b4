"""Checks PromQL against the series kubeloop really exports: every selector's metric name,
labels and (for labels with a closed set of values) label values are matched against what the
operator and the serving runtime register in prometheus_client, so a rule or a dashboard panel
on a series nothing exports fails in a test instead of staying silent in production."""

from __future__ import annotations

import re
from typing import Any, get_args

import promql_parser as pp
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import kubeloop.serving.feedback
import kubeloop.serving.metrics
import kubeloop.serving.request_log  # noqa: F401  (registers its metrics)
from kubeloop.api.crdgen import all_crds
from kubeloop.api.training_run import TrainingRunStatus
from kubeloop.contract import serving_metrics as contract
from kubeloop.handlers import metrics
from kubeloop.handlers.errors import Result
from kubeloop.planning.promql import selectors

# Labels the scrape adds to every series (Prometheus' target labels, the ServiceMonitor's).
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "endpoint", "container"}
# Series Prometheus makes itself: name -> labels.
SYNTHETIC = {"up": set(TARGET_LABELS)}
# Labels whose values are a closed set, by series. The reconcile result is what
# handlers/errors.py classifies into, plus success; the HTTP codes are those the runtime
# pre-creates plus 503 (not ready).
KINDS = {crd["spec"]["names"]["kind"] for crd in all_crds().values()}
VALUES: dict[tuple[str, str], set[str]] = {
    ("kubeloop_reconcile_total", "result"): {"success", *get_args(Result)},
    ("kubeloop_reconcile_total", "kind"): KINDS,
    ("kubeloop_training_run_phase", "phase"): set(
        get_args(TrainingRunStatus.model_fields["phase"].annotation)
    ),
    ("kubeloop_rollouts_total", "result"): set(metrics.ROLLOUT_RESULTS),
    ("kubeloop_retrain_outcomes_total", "outcome"): set(metrics.RETRAIN_ENDS),
    ("kubeloop_reconcile_duration_seconds_bucket", "kind"): KINDS,
    ("kubeloop_requests_total", "code"): {"200", "400", "500", "503"},
    ("kubeloop_request_log_dropped_rows_total", "reason"): set(contract.REQUEST_LOG_DROP_REASONS),
    ("kubeloop_request_log_dropped_rows_total", "stream"): set(contract.REQUEST_LOG_STREAMS),
    ("kubeloop_request_log_rows_total", "stream"): set(contract.REQUEST_LOG_STREAMS),
    ("kubeloop_feedback_labels_total", "outcome"): set(contract.FEEDBACK_OUTCOMES),
    ("kubeloop_feedback_evictions_total", "reason"): set(contract.FEEDBACK_EVICTION_REASONS),
    # The chart's ServiceMonitor: jobLabel app.kubernetes.io/name.
    ("up", "job"): {"kubeloop"},
}


def exported() -> dict[str, set[str]]:
    """Every kubeloop sample name prometheus_client exposes, with its labels."""
    series: dict[str, set[str]] = {}
    for collector, names in REGISTRY._collector_to_names.items():
        labels: set[str] = set()
        if isinstance(collector, MetricWrapperBase):
            labels = set(collector._labelnames)
        else:
            for family in collector.collect():  # e.g. the runtime's bucket counters
                labels |= set(getattr(family, "_labelnames", ()))
        for name in names:
            if name.startswith("kubeloop_"):
                series[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return series


def _matches(matcher: pp.Matcher, value: str) -> bool:
    if matcher.op == pp.MatchOp.Equal:
        return value == matcher.value
    if matcher.op == pp.MatchOp.NotEqual:
        return value != matcher.value
    hit = re.fullmatch(matcher.value, value) is not None
    return hit if matcher.op == pp.MatchOp.Re else not hit


def problems(expr: str) -> list[str]:
    """What in ``expr`` names a series, a label or a label value that nothing exports."""
    known = {**exported(), **SYNTHETIC}
    found: list[str] = []
    parsed = pp.parse(expr)
    for vs in selectors(parsed):
        if vs.name is None:
            found.append(f"{vs.prettify()}: a selector without a metric name cannot be checked")
            continue
        if vs.name not in known:
            found.append(f"{vs.name}: no such series is exported")
            continue
        labels = known[vs.name] | TARGET_LABELS
        groups = list(vs.matchers.or_matchers) or [list(vs.matchers.matchers)]
        for m in [m for group in groups for m in group if m.name != "__name__"]:
            if m.name not in labels:
                found.append(f"{vs.name}: no label {m.name!r} (it has {sorted(known[vs.name])})")
            elif (values := VALUES.get((vs.name, m.name))) is not None:
                if m.op in (pp.MatchOp.Equal, pp.MatchOp.Re):
                    if not any(_matches(m, v) for v in values):
                        found.append(
                            f"{vs.name}: {m.name} never matches {m.value!r} ({sorted(values)})"
                        )
                    elif m.op == pp.MatchOp.Re:
                        for part in m.value.split("|"):
                            if not any(re.fullmatch(part, v) for v in values):
                                found.append(
                                    f"{vs.name}: {m.name} alternative {part!r} matches nothing"
                                )
                elif m.value not in values and not any(re.fullmatch(m.value, v) for v in values):
                    found.append(f"{vs.name}: {m.name} is never {m.value!r} ({sorted(values)})")
    found += _grouping_problems(parsed, known)
    return found


def _grouping_problems(expr: Any, known: dict[str, set[str]]) -> list[str]:
    """``by (...)`` labels that no selector under the aggregation carries."""
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, pp.AggregateExpr):
            mod = node.modifier
            if mod is not None and mod.type == pp.AggModifierType.By:
                have = set(TARGET_LABELS)
                for vs in selectors(node.expr):
                    have |= known.get(vs.name or "", set())
                found.extend(
                    f"by ({label}): no series under it has it"
                    for label in mod.labels
                    if label not in have
                )
            visit(node.expr)
        elif isinstance(node, pp.BinaryExpr):
            visit(node.lhs)
            visit(node.rhs)
        elif isinstance(node, pp.Call):
            for arg in node.args:
                visit(arg)
        elif isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr | pp.MatrixSelector):
            visit(node.expr if not isinstance(node, pp.MatrixSelector) else node.vector_selector)

    visit(expr)
    return found
