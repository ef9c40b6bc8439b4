"""The chart's alert rules match series that really exist, and fire.

Every selector in every rule is checked against the metrics the operator and the serving runtime
register in prometheus_client (tests/series_check.py: name, labels, and the values of labels
whose values are a closed set), so a rule on a metric or a label value nothing exports fails
here instead of staying silent in production. ``promtool test rules`` then feeds each alert
series shaped like the real ones (themselves checked the same way) and asserts it fires, and
near misses and asserts it stays quiet.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.series_check import exported, problems

RULES = ROOT / "charts" / "kubeloop" / "files" / "prometheus-rules.yaml"


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# --- the checker itself --------------------------------------------------------------------


def test_the_checker_finds_what_nothing_exports() -> None:
    assert problems('kubeloop_reconcile_total{result="failed"}') == []
    assert problems('kubeloop_reconcile_total{result=~"error|failed"}') == []
    assert problems('kubeloop_reconcile_total{result="errors"}')  # a value never emitted
    assert problems('kubeloop_reconcile_total{result=~"error|failure"}')  # one alternative
    assert problems("kubeloop_reconciles_total")  # a name never exported
    assert problems('kubeloop_requests_total{status="500"}')  # the label is `code`
    assert problems("sum by (model) (kubeloop_reconcile_total)")  # grouping by a missing label
    assert problems('kubeloop_requests_total{code=~"5.."}') == []
    assert problems('kubeloop_drift_breached{namespace="team-a"}') == []


def test_the_metrics_the_rules_need_are_registered() -> None:
    series = exported()
    for name in (
        "kubeloop_reconcile_total",
        "kubeloop_drift_breached",
        "kubeloop_retrains_total",
        "kubeloop_requests_total",
        "kubeloop_request_duration_seconds_bucket",
        "kubeloop_request_log_dropped_rows_total",
    ):
        assert name in series, sorted(series)


# --- the rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_every_rule_reads_real_series(rule: dict[str, Any]) -> None:
    assert problems(rule["expr"]) == [], rule["expr"]
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}


# Each alert, the series that make it fire (shaped like the real ones), and the labels it
# fires with. promtool: "a+bxN" is a, a+b, ... N+1 samples one interval (1m) apart.
CASES: list[tuple[str, list[tuple[str, str]], str, dict[str, str]]] = [
    (
        "KubeloopOperatorDown",
        [('up{job="kubeloop",namespace="kubeloop-system"}', "0x20")],
        "10m",
        {},
    ),
    (
        "KubeloopReconcileErrors",
        [
            ('kubeloop_reconcile_total{kind="ModelDeployment",result="error"}', "0+2x40"),
            ('kubeloop_reconcile_total{kind="ModelDeployment",result="success"}', "0+50x40"),
        ],
        "30m",
        {"kind": "ModelDeployment"},
    ),
    (
        "KubeloopReconcileRetrying",
        [
            ('kubeloop_reconcile_total{kind="TrainingRun",result="retry"}', "0+10x60"),
            ('kubeloop_reconcile_total{kind="TrainingRun",result="success"}', "0+1x60"),
        ],
        "55m",
        {"kind": "TrainingRun"},
    ),
    (
        "KubeloopDriftBreached",
        [
            (
                'kubeloop_drift_breached{namespace="team-a",policy="churn",job="kubeloop"}',
                "0 0 1 1 1",
            )
        ],
        "4m",
        {"namespace": "team-a", "policy": "churn"},
    ),
    (
        "KubeloopRetrainStarted",
        [('kubeloop_retrains_total{namespace="team-a",policy="churn"}', "0 0 0 1 1 1")],
        "4m",
        {"namespace": "team-a", "policy": "churn"},
    ),
    (
        "KubeloopRetrainsFrequent",
        [('kubeloop_retrains_total{namespace="team-a",policy="churn"}', "0+1x4 4+0x30")],
        "30m",
        {"namespace": "team-a", "policy": "churn"},
    ),
    (
        "KubeloopServingErrors",
        [
            (
                'kubeloop_requests_total{namespace="team-a",model="churn",version="3",code="200"}',
                "0+90x30",
            ),
            (
                'kubeloop_requests_total{namespace="team-a",model="churn",version="3",code="500"}',
                "0+10x30",
            ),
        ],
        "25m",
        {"namespace": "team-a", "model": "churn", "version": "3"},
    ),
    (
        "KubeloopServingSlow",
        [
            (
                'kubeloop_request_duration_seconds_bucket{namespace="team-a",model="churn",version="3",le="1.0"}',
                "0+1x30",
            ),
            (
                'kubeloop_request_duration_seconds_bucket{namespace="team-a",model="churn",version="3",le="2.5"}',
                "0+100x30",
            ),
            (
                'kubeloop_request_duration_seconds_bucket{namespace="team-a",model="churn",version="3",le="+Inf"}',
                "0+100x30",
            ),
        ],
        "25m",
        {"namespace": "team-a", "model": "churn", "version": "3"},
    ),
    (
        "KubeloopRequestLogLosingRows",
        [
            (
                'kubeloop_request_log_dropped_rows_total{namespace="team-a",model="churn",version="3",stream="predictions",reason="queue_full"}',
                "0+5x30",
            ),
            # Dropped by configuration: not an alert.
            (
                'kubeloop_request_log_dropped_rows_total{namespace="team-b",model="churn",version="1",stream="predictions",reason="sampled_out"}',
                "0+500x30",
            ),
        ],
        "25m",
        {"namespace": "team-a", "model": "churn", "reason": "queue_full"},
    ),
]


CASES += [
    (
        "KubeloopRetrainFailed",
        [
            (
                'kubeloop_retrain_outcomes_total{namespace="team-a",policy="churn",outcome="GatesFailed"}',
                "0 0 0 1 1 1",
            )
        ],
        "4m",
        {"namespace": "team-a", "policy": "churn", "outcome": "GatesFailed"},
    ),
    (
        "KubeloopRetrainCapReached",
        [
            ('kubeloop_retrains_today{namespace="team-a",policy="churn"}', "3x30"),
            ('kubeloop_retrains_daily_cap{namespace="team-a",policy="churn"}', "3x30"),
            ('kubeloop_drift_breached{namespace="team-a",policy="churn"}', "1x30"),
        ],
        "15m",
        {"namespace": "team-a", "policy": "churn"},
    ),
    (
        "KubeloopRolloutRolledBack",
        [
            (
                'kubeloop_rollouts_total{namespace="team-a",deployment="churn",result="RolledBack"}',
                "0 0 0 1 1",
            )
        ],
        "4m",
        {"namespace": "team-a", "deployment": "churn"},
    ),
    (
        "KubeloopTrainingRunFailed",
        [
            (
                'kubeloop_training_run_phase{namespace="team-a",training_run="churn",phase="Failed"}',
                "1x10",
            )
        ],
        "5m",
        {"namespace": "team-a", "training_run": "churn"},
    ),
]

# Alerts that rightly fire on another alert's series: a spent cap matters while drift is breached.
ALSO_FIRING = {"KubeloopRetrainCapReached": {"KubeloopDriftBreached"}}

# Each alert, series that come close without meaning what it alerts on: it must stay quiet.
QUIET: list[tuple[str, list[tuple[str, str]], str]] = [
    (
        "KubeloopOperatorDown",
        [('up{job="kubeloop",namespace="kubeloop-system"}', "0x3 1x20")],
        "10m",
    ),
    (  # one scrape down for less than `for`
        "KubeloopOperatorDown",
        [('up{job="kubeloop",namespace="kubeloop-system"}', "1x5 0x3 1x10")],
        "9m",
    ),
    (
        "KubeloopReconcileErrors",
        [
            ('kubeloop_reconcile_total{kind="ModelDeployment",result="error"}', "0+1x5 5+0x40"),
            ('kubeloop_reconcile_total{kind="ModelDeployment",result="success"}', "0+50x45"),
        ],
        "40m",
    ),
    (  # half the passes retry: the rule wants most
        "KubeloopReconcileRetrying",
        [
            ('kubeloop_reconcile_total{kind="TrainingRun",result="retry"}', "0+5x60"),
            ('kubeloop_reconcile_total{kind="TrainingRun",result="success"}', "0+6x60"),
        ],
        "55m",
    ),
    (
        "KubeloopDriftBreached",
        [('kubeloop_drift_breached{namespace="team-a",policy="churn",job="kubeloop"}', "0x10")],
        "8m",
    ),
    (  # the retrain was more than 10 minutes ago
        "KubeloopRetrainStarted",
        [('kubeloop_retrains_total{namespace="team-a",policy="churn"}', "0 1x30")],
        "25m",
    ),
    (
        "KubeloopRetrainsFrequent",
        [('kubeloop_retrains_total{namespace="team-a",policy="churn"}', "0+1x2 2+0x30")],
        "30m",
    ),
    (  # a promotion is the loop working
        "KubeloopRetrainFailed",
        [
            (
                'kubeloop_retrain_outcomes_total{namespace="team-a",policy="churn",outcome="Promoted"}',
                "0 0 1 1 1",
            ),
            (
                'kubeloop_retrain_outcomes_total{namespace="team-a",policy="churn",outcome="GatesFailed"}',
                "0x5",
            ),
        ],
        "4m",
    ),
    (  # cap spent but no breach: nothing waits for a retrain
        "KubeloopRetrainCapReached",
        [
            ('kubeloop_retrains_today{namespace="team-a",policy="churn"}', "3x30"),
            ('kubeloop_retrains_daily_cap{namespace="team-a",policy="churn"}', "3x30"),
            ('kubeloop_drift_breached{namespace="team-a",policy="churn"}', "0x30"),
        ],
        "15m",
    ),
    (  # breached with the cap not spent: a retrain can start
        "KubeloopRetrainCapReached",
        [
            ('kubeloop_retrains_today{namespace="team-a",policy="churn"}', "2x30"),
            ('kubeloop_retrains_daily_cap{namespace="team-a",policy="churn"}', "3x30"),
            ('kubeloop_drift_breached{namespace="team-a",policy="churn"}', "1x30"),
        ],
        "15m",
    ),
    (
        "KubeloopRolloutRolledBack",
        [
            (
                'kubeloop_rollouts_total{namespace="team-a",deployment="churn",result="Promoted"}',
                "0 0 1 1 1",
            ),
            (
                'kubeloop_rollouts_total{namespace="team-a",deployment="churn",result="RolledBack"}',
                "0x5",
            ),
        ],
        "4m",
    ),
    (
        "KubeloopTrainingRunFailed",
        [
            (
                'kubeloop_training_run_phase{namespace="team-a",training_run="churn",phase="Succeeded"}',
                "1x10",
            )
        ],
        "5m",
    ),
    (  # 2 % errors: under the 5 % the rule alerts on
        "KubeloopServingErrors",
        [
            (
                'kubeloop_requests_total{namespace="team-a",model="churn",version="3",code="200"}',
                "0+98x30",
            ),
            (
                'kubeloop_requests_total{namespace="team-a",model="churn",version="3",code="500"}',
                "0+2x30",
            ),
        ],
        "25m",
    ),
    (  # p99 under a second
        "KubeloopServingSlow",
        [
            (
                'kubeloop_request_duration_seconds_bucket{namespace="team-a",model="churn",version="3",le="0.5"}',
                "0+100x30",
            ),
            (
                'kubeloop_request_duration_seconds_bucket{namespace="team-a",model="churn",version="3",le="+Inf"}',
                "0+100x30",
            ),
        ],
        "25m",
    ),
    (  # drops by configuration
        "KubeloopRequestLogLosingRows",
        [
            (
                'kubeloop_request_log_dropped_rows_total{namespace="team-a",model="churn",version="3",stream="predictions",reason="over_cap"}',
                "0+5x30",
            )
        ],
        "25m",
    ),
]


def test_every_alert_has_a_case() -> None:
    assert {r["alert"] for r in rules()} == {c[0] for c in CASES}
    assert {r["alert"] for r in rules()} == {c[0] for c in QUIET}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_the_cases_use_real_series(
    case: tuple[str, list[tuple[str, str]], str, dict[str, str]],
) -> None:
    for series, _ in case[1]:
        assert problems(series) == [], series


@pytest.mark.parametrize("case", QUIET, ids=lambda c: c[0])
def test_the_quiet_cases_use_real_series(case: tuple[str, list[tuple[str, str]], str]) -> None:
    for series, _ in case[1]:
        assert problems(series) == [], series


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_the_rules() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout, out.stdout


UP = ('up{job="kubeloop",namespace="kubeloop-system"}', "1x90")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_alerts_fire(tmp_path: Path) -> None:
    """One promtool test per alert: it fires on its series with the labels it should, and
    every other alert stays quiet on them. The annotations are left out of the copy promtool
    reads (it would compare their rendered text too)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}))
    names = {r["alert"] for r in rules()}
    tests = []
    for alert, series, at, labels in CASES:
        severity = next(r for r in rules() if r["alert"] == alert)["labels"]["severity"]
        expected = [{"exp_labels": {"severity": severity, **labels}}]
        checks = [{"eval_time": at, "alertname": alert, "exp_alerts": expected}]
        checks += [
            {"eval_time": at, "alertname": other, "exp_alerts": []}
            for other in sorted(names - {alert} - ALSO_FIRING.get(alert, set()))
        ]
        inputs = series if alert == "KubeloopOperatorDown" else [UP, *series]
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in inputs],
                "alert_rule_test": checks,
            }
        )
    for alert, series, at in QUIET:
        inputs = series if alert == "KubeloopOperatorDown" else [UP, *series]
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in inputs],
                "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": []}],
            }
        )
    spec = tmp_path / "tests.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rule_file)], "evaluation_interval": "1m", "tests": tests}
        )
    )
    out = subprocess.run(
        ["promtool", "test", "rules", str(spec)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
