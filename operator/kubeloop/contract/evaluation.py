"""The metrics each task produces: the evaluate step computes them, gates and tuning
objectives may name them, the registry shows them."""

from __future__ import annotations

from typing import Final

CLASSIFICATION_METRICS: Final = (
    "accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "minority_recall",
)  # fmt: skip
REGRESSION_METRICS: Final = ("mse", "rmse", "mae", "r2")
# Measured on the serving artifact, for every task.
SERVING_METRICS: Final = ("latency_ms", "size_mb")

QUALITY_METRICS_BY_TASK: Final = {
    "classification": CLASSIFICATION_METRICS,
    "regression": REGRESSION_METRICS,
}
METRICS_BY_TASK: Final = {
    task: (*quality, *SERVING_METRICS) for task, quality in QUALITY_METRICS_BY_TASK.items()
}
# Test metrics of rows ranked within query groups: only with data.groupColumn, for either task.
RANKING_METRICS: Final = ("map_at_k", "ndcg_at_k")
# Every metric a gate may name (the API's GateMetric enum, checked equal by a unit test).
ALL_METRICS: Final = (
    *CLASSIFICATION_METRICS, *REGRESSION_METRICS, *SERVING_METRICS, *RANKING_METRICS,
)  # fmt: skip


def gate_metrics(task: str, *, ranked: bool) -> tuple[str, ...]:
    """The test metrics evaluation produces for ``task``; with ``ranked`` (data.groupColumn
    set) the ranking metrics too. Tuning objectives are validation metrics: see
    QUALITY_METRICS_BY_TASK."""
    return (*METRICS_BY_TASK[task], *(RANKING_METRICS if ranked else ()))


# Lower is better for these; higher for every other metric.
LOWER_IS_BETTER: Final = frozenset({"mse", "rmse", "mae", "latency_ms", "size_mb"})
