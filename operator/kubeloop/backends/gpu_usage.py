"""What a namespace's GPU budget is made of, read from the API and parsed at the edge: its
ResourceQuotas and what its TrainingRuns hold (``planning/admission.py`` does the arithmetic)."""

from __future__ import annotations

from kubeloop.backends.kube import RESOURCE_QUOTAS, TRAINING_RUNS, KubeClient
from kubeloop.planning.admission import Quota, RunUsage


async def observe_gpu_usage(kube: KubeClient, namespace: str) -> tuple[list[Quota], list[RunUsage]]:
    quotas = [
        Quota(q["metadata"]["name"], (q.get("spec") or {}).get("hard") or {})
        for q in await kube.list(RESOURCE_QUOTAS, namespace)
    ]
    runs = [
        RunUsage(
            r["metadata"]["name"],
            str((r.get("status") or {}).get("phase", "")),
            int(((r.get("spec") or {}).get("resources") or {}).get("gpu", 0)),
        )
        for r in await kube.list(TRAINING_RUNS, namespace)
    ]
    return quotas, runs
