"""The Grafana dashboard the chart ships (charts/kubeloop/files/dashboard.json), built here.

    python -m hack.dashboard          # rewrite the JSON
    python -m hack.dashboard --check  # fail if the JSON differs from what this builds

One screen for the loop, top to bottom in the order a model lives it: serving (per model and
version: request rate, 5xx ratio, p99 latency), rollouts (canary weight, phase, finished
rollouts), drift (each signal against its threshold, breaches, retrains and their outcomes, the
daily cap), training (runs by phase, GPUs per namespace) and the operator (reconcile rate,
errors, p99 latency, replicas up). Every query reads series the operator or the serving runtime
export (tests/unit/test_dashboard.py checks names and labels as the alert rules are checked;
tests/integration/test_drift_loop.py checks that each query returns series after the loop).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "charts" / "kubeloop" / "files" / "dashboard.json"
UID = "kubeloop-loop"

NS = 'namespace=~"$namespace"'
BY_VERSION = "sum by (namespace, model, version)"
RATE = "$__rate_interval"
RANGE = "$__range"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | state-timeline | bargauge
    width: int = 8


SERVING = (
    Panel(
        "Requests per second",
        "Answered requests by model and version (the serving runtime's kubeloop_requests_total).",
        (
            Query(
                f"{BY_VERSION} (rate(kubeloop_requests_total{{{NS}}}[{RATE}]))",
                "{{namespace}}/{{model}} v{{version}}",
            ),
        ),
        unit="reqps",
    ),
    Panel(
        "5xx ratio",
        "Share of requests answered with a 5xx, by model and version.",
        (
            Query(
                f'{BY_VERSION} (rate(kubeloop_requests_total{{{NS},code=~"5.."}}[{RATE}]))'
                f" / {BY_VERSION} (rate(kubeloop_requests_total{{{NS}}}[{RATE}]))",
                "{{namespace}}/{{model}} v{{version}}",
            ),
        ),
        unit="percentunit",
    ),
    Panel(
        "p99 latency",
        "99th percentile of request latency by model and version.",
        (
            Query(
                "histogram_quantile(0.99, sum by (namespace, model, version, le) "
                f"(rate(kubeloop_request_duration_seconds_bucket{{{NS}}}[{RATE}])))",
                "{{namespace}}/{{model}} v{{version}}",
            ),
        ),
        unit="s",
    ),
)

ROLLOUTS = (
    Panel(
        "Canary weight",
        "Percent of each ModelDeployment's traffic its canary receives (0: no canary).",
        (
            Query(
                f"max by (namespace, deployment) (kubeloop_rollout_canary_weight_percent{{{NS}}})",
                "{{namespace}}/{{deployment}}",
            ),
        ),
        unit="percent",
    ),
    Panel(
        "Rollout phase",
        "The phase each ModelDeployment is in (Serving, Progressing, Paused, RolledBack...).",
        (
            Query(
                f"max by (namespace, deployment, phase) (kubeloop_rollout_phase{{{NS}}}) == 1",
                "{{namespace}}/{{deployment}} {{phase}}",
            ),
        ),
        kind="state-timeline",
    ),
    Panel(
        "Rollouts finished",
        "Rollouts that ended in the time range, by result (RolledBack: the canary lost).",
        (
            Query(
                "sum by (namespace, deployment, result) "
                f"(increase(kubeloop_rollouts_total{{{NS}}}[{RANGE}]))",
                "{{namespace}}/{{deployment}} {{result}}",
            ),
        ),
        kind="bargauge",
    ),
)

DRIFT = (
    Panel(
        "Drift signals and thresholds",
        "Each DriftPolicy signal's latest conclusive value, and the threshold it is held to "
        "(dashed). A gap is an inconclusive window (too few rows), never a pass.",
        (
            Query(
                f"max by (namespace, policy, signal) (kubeloop_drift_signal_value{{{NS}}})",
                "{{namespace}}/{{policy}} {{signal}}",
            ),
            Query(
                f"max by (namespace, policy, signal) (kubeloop_drift_signal_threshold{{{NS}}})",
                "{{namespace}}/{{policy}} {{signal}} threshold",
            ),
        ),
        width=12,
    ),
    Panel(
        "Breached",
        "1 while a policy's breach has held for its `for` duration.",
        (
            Query(
                f"max by (namespace, policy) (kubeloop_drift_breached{{{NS}}})",
                "{{namespace}}/{{policy}}",
            ),
        ),
        kind="state-timeline",
        width=12,
    ),
    Panel(
        "Retrains and outcomes",
        "Retrains started in the time range, and how they ended (Promoted, RolledBack, "
        "GatesFailed, Failed).",
        (
            Query(
                f"sum by (namespace, policy) (increase(kubeloop_retrains_total{{{NS}}}[{RANGE}]))",
                "{{namespace}}/{{policy}} started",
            ),
            Query(
                "sum by (namespace, policy, outcome) "
                f"(increase(kubeloop_retrain_outcomes_total{{{NS}}}[{RANGE}]))",
                "{{namespace}}/{{policy}} {{outcome}}",
            ),
        ),
        kind="bargauge",
        width=12,
    ),
    Panel(
        "Retrains today and the daily cap",
        "Retrains in the last 24 h against spec.action.maxRetrainsPerDay.",
        (
            Query(
                f"max by (namespace, policy) (kubeloop_retrains_today{{{NS}}})",
                "{{namespace}}/{{policy}} today",
            ),
            Query(
                f"max by (namespace, policy) (kubeloop_retrains_daily_cap{{{NS}}})",
                "{{namespace}}/{{policy}} cap",
            ),
        ),
        width=12,
    ),
)

TRAINING = (
    Panel(
        "Training runs by phase",
        "TrainingRuns per namespace in each phase (Queued: waiting for GPU budget).",
        (
            Query(
                f"count by (namespace, phase) (kubeloop_training_run_phase{{{NS}}} == 1)",
                "{{namespace}} {{phase}}",
            ),
        ),
        width=12,
    ),
    Panel(
        "GPUs requested per namespace",
        "GPUs held by running TrainingRuns and wanted by queued ones.",
        (
            Query(
                f"sum by (namespace, state) (kubeloop_training_run_gpus{{{NS}}})",
                "{{namespace}} {{state}}",
            ),
        ),
        width=12,
    ),
)

OPERATOR = (
    Panel(
        "Reconciles per second",
        "Daemon passes and handler calls by kind and result (the active replica does them).",
        (
            Query(
                f"sum by (kind, result) (rate(kubeloop_reconcile_total[{RATE}]))",
                "{{kind}} {{result}}",
            ),
        ),
        unit="ops",
        width=6,
    ),
    Panel(
        "Reconcile errors and retries",
        "Passes that failed: error (unexpected), failed (refused), retry (will heal).",
        (
            Query(
                "sum by (kind, result) "
                f'(rate(kubeloop_reconcile_total{{result=~"error|failed|retry"}}[{RATE}]))',
                "{{kind}} {{result}}",
            ),
        ),
        unit="ops",
        width=6,
    ),
    Panel(
        "Reconcile p99 latency",
        "99th percentile of one pass, by kind.",
        (
            Query(
                "histogram_quantile(0.99, sum by (kind, le) "
                f"(rate(kubeloop_reconcile_duration_seconds_bucket[{RATE}])))",
                "{{kind}}",
            ),
        ),
        unit="s",
        width=6,
    ),
    Panel(
        "Replicas: up and active",
        "Replicas scraped, and the resources each one reconciles: the active replica runs "
        "them all, a standby none (kopf peering).",
        (
            Query('sum(up{job="kubeloop"})', "up"),
            Query('sum by (instance) (kubeloop_daemons{job="kubeloop"})', "{{instance}}"),
        ),
        width=6,
    ),
)

ROWS = (
    ("Serving", SERVING),
    ("Rollouts", ROLLOUTS),
    ("Drift and retraining", DRIFT),
    ("Training", TRAINING),
    ("Operator", OPERATOR),
)


def panels() -> list[Panel]:
    return [panel for _, row in ROWS for panel in row]


def resolved(expr: str, *, namespace: str = ".*", rate: str = "1m", range_: str = "1h") -> str:
    """``expr`` with Grafana's variables replaced the way Grafana would (for a test or a
    Prometheus that runs it without Grafana)."""
    return expr.replace("$namespace", namespace).replace(RATE, rate).replace(RANGE, range_)


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    overrides = []
    if any(q.legend.endswith(("threshold", "cap")) for q in panel.queries):
        overrides.append(
            {
                "matcher": {"id": "byRegexp", "options": ".*(threshold|cap)$"},
                "properties": [
                    {
                        "id": "custom.lineStyle",
                        "value": {"fill": "dash", "dash": [10, 10]},
                    }
                ],
            }
        )
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": q.expr,
                "legendFormat": q.legend,
                "range": panel.kind != "bargauge",
                "instant": panel.kind == "bargauge",
            }
            for i, q in enumerate(panel.queries)
        ],
    }


def build() -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, row in ROWS:
        out.append(
            {
                "id": pid,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x = pid + 1, y + 1, 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            out.append(_panel_json(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += 8
    namespaces = (
        "label_values({__name__=~"
        '"kubeloop_requests_total|kubeloop_training_run_phase|kubeloop_rollout_phase|'
        'kubeloop_drift_policy_phase"}, namespace)'
    )
    return {
        "uid": UID,
        "title": "kubeloop — the ML loop",
        "description": "Serving, canary rollouts, drift, retraining, training and the operator.",
        "tags": ["kubeloop", "mlops"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": namespaces, "refId": "namespaces"},
                    "definition": namespaces,
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {},
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": out,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    args = parser.parse_args()
    if args.check:
        if not OUT.exists() or OUT.read_text() != render():
            print(f"{OUT} is out of date: run `python -m hack.dashboard`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
