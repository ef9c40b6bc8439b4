"""The Grafana dashboard: up to date with hack/dashboard.py, laid out on Grafana's 24-column
grid, and every panel's PromQL parsed by promql-parser and read from series kubeloop exports
(tests/integration/test_drift_loop.py then runs each query against a real Prometheus after the
loop and requires series back)."""

from __future__ import annotations

import json
from typing import Any

import promql_parser as pp
import pytest
from hack import dashboard

from kubeloop.planning.promql import selectors
from tests.series_check import exported, problems

PANELS = dashboard.panels()


def test_the_shipped_json_is_what_the_builder_makes() -> None:
    assert dashboard.OUT.read_text() == dashboard.render(), "run `python -m hack.dashboard`"


def test_the_layout_is_a_valid_grid() -> None:
    board: dict[str, Any] = json.loads(dashboard.OUT.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0, p["title"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"], p["title"]
            assert all(t["expr"] for t in p["targets"]), p["title"]
    names = {v["name"] for v in board["templating"]["list"]}
    assert names == {"datasource", "namespace"}


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p.title)
def test_every_query_parses_and_reads_real_series(panel: dashboard.Panel) -> None:
    for query in panel.queries:
        expr = dashboard.resolved(query.expr)
        pp.parse(expr)  # raises on a syntax error
        assert problems(expr) == [], expr


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p.title)
def test_namespaced_series_follow_the_namespace_variable(panel: dashboard.Panel) -> None:
    """A panel over tenants' series shows the namespaces picked at the top, never all of them."""
    known = exported()
    for query in panel.queries:
        for vs in selectors(pp.parse(dashboard.resolved(query.expr, namespace="NS"))):
            if "namespace" in known.get(vs.name or "", set()):
                matchers = {(m.name, m.value) for m in vs.matchers.matchers}
                assert ("namespace", "NS") in matchers, query.expr


def test_the_loop_is_on_one_screen() -> None:
    """What the issue asks the screen to show, by the series each part reads."""
    read = {
        vs.name
        for panel in PANELS
        for query in panel.queries
        for vs in selectors(pp.parse(dashboard.resolved(query.expr)))
    }
    assert {
        "kubeloop_requests_total",
        "kubeloop_request_duration_seconds_bucket",
        "kubeloop_rollout_canary_weight_percent",
        "kubeloop_rollout_phase",
        "kubeloop_drift_signal_value",
        "kubeloop_drift_signal_threshold",
        "kubeloop_retrains_total",
        "kubeloop_retrain_outcomes_total",
        "kubeloop_training_run_phase",
        "kubeloop_training_run_gpus",
        "kubeloop_reconcile_total",
        "kubeloop_reconcile_duration_seconds_bucket",
    } <= read


def test_the_checks_can_fail() -> None:
    assert problems(
        dashboard.resolved('sum(rate(kubeloop_request_total{namespace=~"$namespace"}[1m]))')
    )
    with pytest.raises(ValueError, match="parenthesis"):
        pp.parse(dashboard.resolved("sum by (namespace (kubeloop_rollout_phase)"))
