"""The canary's labelled-quality measurements: which PromQL ``measure`` asks for, and what it
makes of the answers (Prometheus faked at its client, the boundary)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, Literal

import pytest

from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.backends.canary_metrics import measure
from kubeloop.backends.prometheus import PrometheusClient, PrometheusUnavailable
from kubeloop.planning import feedback_queries as fq
from kubeloop.planning.canary import LabelledQuality

Task = Literal["classification", "regression"]
Query = Callable[[str, str, str, str], str]
T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
NOW = T0 + dt.timedelta(minutes=10)
WINDOW = "660s"  # the rollout so far (600 s) and one interval (60 s)


class FakePrometheus(PrometheusClient):
    """Answers the queries it was given, and nothing else (as an empty series would)."""

    def __init__(self, answers: dict[str, float], *, down: bool = False) -> None:
        super().__init__("http://prometheus.invalid")
        self.answers, self.down = answers, down
        self.asked: list[str] = []

    async def query_value(self, promql: str) -> float | None:
        if self.down:
            raise PrometheusUnavailable("connection refused")
        self.asked.append(promql)
        return self.answers.get(promql)

    async def query_vector(self, promql: str, label: str | None = None) -> dict[str, float]:
        self.asked.append(promql)
        return {}


def deployment(**analysis: Any) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "metadata": {"name": "churn", "namespace": "team-a"},
            "spec": {
                "model": {"modelVersion": {"name": "churn-v2"}},
                "rollout": {"interval": "60s", "analysis": analysis},
            },
            "status": {"rolloutStartedAt": "2026-05-01T12:00:00Z"},
        }
    )


def answers(quality: Query, mine: float, theirs: float) -> dict[str, float]:
    args = ("team-a", "churn")
    return {
        quality(*args, "churn-v2", WINDOW): mine,
        quality(*args, "churn-v1", WINDOW): theirs,
        fq.labelled_rows(*args, "churn-v2", WINDOW): 120,
        fq.labelled_rows(*args, "churn-v1", WINDOW): 900,
    }


@pytest.mark.parametrize(
    ("task", "quality"), [("classification", fq.accuracy), ("regression", fq.mae)]
)
async def test_labelled_quality_of_both_versions_over_the_rollout_so_far(
    task: Task, quality: Query
) -> None:
    prom = FakePrometheus(answers(quality, 0.81, 0.93))
    got = await measure(
        prom,
        deployment(maxAccuracyDrop=0.02),
        stable="churn-v1",
        candidate="churn-v2",
        now=NOW,
        task=task,
    )
    assert got.values.labelled == LabelledQuality(task, 0.81, 0.93, 120, 900)
    assert got.warnings == []


@pytest.mark.parametrize(
    ("analysis", "task"),
    [({}, "classification"), ({"maxAccuracyDrop": 0.02}, None)],
    ids=["check-off", "task-unknown"],
)
async def test_no_feedback_queries_without_the_check_or_a_task(
    analysis: dict[str, Any], task: Task | None
) -> None:
    prom = FakePrometheus(answers(fq.accuracy, 0.81, 0.93))
    got = await measure(
        prom, deployment(**analysis), stable="churn-v1", candidate="churn-v2", now=NOW, task=task
    )
    assert got.values.labelled is None
    assert not [q for q in prom.asked if "feedback" in q]
    assert prom.asked  # the other checks were measured


async def test_an_unreachable_prometheus_measures_nothing() -> None:
    prom = FakePrometheus({}, down=True)
    got = await measure(
        prom,
        deployment(maxAccuracyDrop=0.02),
        stable="churn-v1",
        candidate="churn-v2",
        now=NOW,
        task="classification",
    )
    assert got.values.labelled is None
    assert [reason for reason, _ in got.warnings] == ["PrometheusUnavailable"]
