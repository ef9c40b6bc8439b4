"""A namespace's GPU budget: how many GPUs its TrainingRuns may hold, and how many they hold.

The limit is the smaller of the operator setting and any ResourceQuota on the run's GPU
resource; the GPUs in use are those of the namespace's other running TrainingRuns, including
the ones this operator admitted a moment ago whose status the API does not show yet (the
admission ledger), so two runs admitted together never overrun the budget. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Quota:
    """A ResourceQuota's hard limits, parsed at the edge."""

    name: str
    hard: Mapping[str, str]


@dataclass(frozen=True)
class RunUsage:
    """What another TrainingRun of the namespace holds."""

    name: str
    phase: str
    gpus: int


@dataclass(frozen=True)
class GpuBudget:
    limit: int | None  # None: no limit
    source: str = ""  # e.g. "ResourceQuota gpu-quota"
    in_use: int = 0


def quantity(value: str) -> int:
    """A whole-GPU quantity (``'4'``, ``'2.0'``); what cannot be read counts as 0."""
    try:
        return int(float(value))
    except ValueError:
        return 0


def gpu_budget(
    *,
    run: str,
    resource: str,
    setting: int | None,
    quotas: Iterable[Quota],
    others: Iterable[RunUsage],
    admitted: Mapping[str, int],
) -> GpuBudget:
    """The budget ``run`` is admitted against. ``admitted`` is the ledger of runs this operator
    admitted (name → GPUs) that may not show ``Running`` in ``others`` yet."""
    limit, source = setting, "operator setting KUBELOOP_GPU_BUDGET"
    for quota in quotas:
        for key in (f"requests.{resource}", resource):
            if key in quota.hard:
                value = quantity(str(quota.hard[key]))
                if limit is None or value < limit:
                    limit, source = value, f"ResourceQuota {quota.name}"
    if limit is None:
        return GpuBudget(None)
    held = {u.name: u.gpus for u in others if u.phase == "Running" and u.name != run}
    held.update({name: gpus for name, gpus in admitted.items() if name != run})
    return GpuBudget(limit, source, sum(held.values()))
