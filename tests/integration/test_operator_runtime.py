"""The operator process itself: its Prometheus metrics and its liveness endpoint."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

from kubeloop.backends.kube import MODEL_VERSIONS, KubeClient
from tests.integration.conftest import condition, eventually, free_port, operator_process


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_count_reconciles_and_liveness_answers(
    kube: KubeClient, namespace: str, artifact_root: Path, tmp_path: Path
) -> None:
    metrics_port, liveness_port = free_port(), free_port()
    proc = operator_process(
        namespace,
        artifact_root,
        tmp_path / "operator.log",
        metrics_port=metrics_port,
        liveness=f"http://127.0.0.1:{liveness_port}/healthz",
    )
    try:
        bad: dict[str, Any] = {
            "apiVersion": "kubeloop.dev/v1alpha1",
            "kind": "ModelVersion",
            "metadata": {"name": "m-v1"},
            "spec": {"modelName": "m", "version": 1, "artifact": {"uri": "file:///elsewhere/m"}},
        }
        good = {
            **bad,
            "metadata": {"name": "m-v2"},
            "spec": {**bad["spec"], "version": 2, "artifact": {"uri": "s3://bucket/m/2"}},
        }
        await kube.create(MODEL_VERSIONS, namespace, bad)
        await kube.create(MODEL_VERSIONS, namespace, good)

        async def both_reconciled() -> bool:
            items = {i["metadata"]["name"]: i for i in await kube.list(MODEL_VERSIONS, namespace)}
            return all(condition(items[n], "Ready") for n in ("m-v1", "m-v2"))

        await eventually(both_reconciled, within=60, what="both reconciled")
        base = f"http://127.0.0.1:{metrics_port}/metrics"

        async def scraped() -> str | None:
            status, text = _get(base)
            done = _metric(text, "kubeloop_reconcile_total", kind="ModelVersion", result="failed")
            return text if status == 200 and done else None

        text = await eventually(scraped, what="metrics")
        assert _metric(text, "kubeloop_reconcile_total", kind="ModelVersion", result="success") == 1
        # The artifact outside the tenant prefix is a permanent failure, counted as such.
        assert _metric(text, "kubeloop_reconcile_total", kind="ModelVersion", result="failed") == 1
        count = _metric(text, "kubeloop_reconcile_duration_seconds_count", kind="ModelVersion")
        assert count == 2
        status, _ = _get(f"http://127.0.0.1:{liveness_port}/healthz")
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(20)
