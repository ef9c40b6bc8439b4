"""High availability: two operators peer through kopf (the chart's ``replicas: 2``), exactly one
reconciles, and when it is SIGKILLed mid-work the standby takes over within the peering
lifetime and finishes the work once: the running TrainingRun keeps its run id and attempt and
registers one ModelVersion, and every ModelVersion of a batch is made Ready once.

The peering CRDs are the chart's own file (charts/kubeloop/files/kopf-peering-crds.yaml); the
peering object is created here as the chart creates it (kopf never creates it itself).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.backends.kube import MODEL_VERSIONS, TRAINING_RUNS, Kind, KubeClient
from tests.conftest import ROOT
from tests.integration.conftest import LocalCluster, eventually, free_port, operator_process
from tests.integration.test_model_version import version, write_artifact
from tests.integration.test_training_run import training_run, wait_phase

PEERING_CRDS = ROOT / "charts" / "kubeloop" / "files" / "kopf-peering-crds.yaml"
PEERINGS = Kind("kopf.dev", "v1", "kopfpeerings")
LIFETIME = 6  # seconds (the chart's default is 15)
RESUMED = "Resuming operations after the pause"


@pytest.fixture
def peering(crds: LocalCluster, namespace: str) -> str:
    crds.kubectl("apply", "-f", str(PEERING_CRDS))
    crds.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev")
    manifest = (
        "apiVersion: kopf.dev/v1\nkind: KopfPeering\n"
        f"metadata: {{name: kubeloop, namespace: {namespace}}}\n"
    )
    crds.kubectl("apply", "-f", "-", input=manifest)
    return "kubeloop"


@pytest.fixture
def peered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peering: str) -> Iterator[Path]:
    """Both operators share the executor's state directory, as replicas share a volume (or,
    with the kfp executor, the Kubeflow API)."""
    state = tmp_path / "state"
    monkeypatch.setenv("KUBELOOP_STATE_DIR", str(state))
    monkeypatch.setenv("KUBELOOP_EXECUTOR", "local")
    monkeypatch.setenv("KUBELOOP_STANDALONE", "false")
    monkeypatch.setenv("KUBELOOP_PEERING_NAME", peering)
    monkeypatch.setenv("KUBELOOP_PEERING_LIFETIME", str(LIFETIME))
    yield state
    LocalExecutor(state).stop_all()


def total(port: int, name: str) -> float:
    """The sum of every series of ``name`` on one operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def logged(log: Path, line: str) -> bool:
    return log.exists() and line in log.read_text(errors="replace")


async def create_versions(
    kube: KubeClient, namespace: str, artifact_root: Path, models: list[str]
) -> None:
    uris = {m: write_artifact(artifact_root, namespace, m, 1) for m in models}
    await asyncio.gather(
        *(kube.create(MODEL_VERSIONS, namespace, version(f"{m}-v1", m, 1, uris[m])) for m in models)
    )


async def assert_finished_once(
    kube: KubeClient, namespace: str, state: Path, run_id: str, models: list[str]
) -> None:
    """The run resumed (same id, one attempt, one registration) and each version is Ready."""
    done = await wait_phase(kube, namespace, "ha", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["runId"] == run_id
    assert done["status"]["attempt"] == 1
    attempts = list((state / "training" / namespace).glob("ha-*/attempt-*"))
    assert [p.name for p in attempts] == ["attempt-1"]

    async def all_ready() -> list[dict[str, Any]] | None:
        items = await kube.list(MODEL_VERSIONS, namespace)
        ok = all((i.get("status") or {}).get("phase") == "Ready" for i in items)
        return items if ok and len(items) == len(models) + 1 else None

    items = await eventually(all_ready, within=90, interval=0.5, what="every version Ready")
    names = sorted(i["metadata"]["name"] for i in items)
    assert names == sorted([*(f"{m}-v1" for m in models), "cancer-v1"])


async def peers(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    body = await kube.get(PEERINGS, namespace, name)
    return dict(body.get("status") or {})


async def test_the_standby_takes_over_from_a_killed_operator_without_duplicates(
    kube: KubeClient,
    namespace: str,
    artifact_root: Path,
    peered: Path,
    peering: str,
    tmp_path: Path,
) -> None:
    logs = {"a": tmp_path / "operator-a.log", "b": tmp_path / "operator-b.log"}
    ports = {"a": free_port(), "b": free_port()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["a"] = operator_process(namespace, artifact_root, logs["a"], metrics_port=ports["a"])

        async def one_peer() -> dict[str, Any]:
            return await peers(kube, namespace, peering)

        await eventually(one_peer, within=60, what="the first operator in the peering")
        procs["b"] = operator_process(namespace, artifact_root, logs["b"], metrics_port=ports["b"])

        async def both_peers() -> bool:
            return len(await peers(kube, namespace, peering)) == 2

        await eventually(both_peers, within=60, what="the second operator in the peering")
        # Peering is mandatory: each starts paused and resumes only when it sees no peer of
        # higher priority (the older one). The younger one sees the older and stays paused.
        await asyncio.sleep(3)
        assert logged(logs["a"], RESUMED), "the older operator must be active"
        assert not logged(logs["b"], RESUMED), "the younger operator must wait"

        # Work for the active one: a training run and a batch of versions.
        await kube.create(TRAINING_RUNS, namespace, training_run("ha"))
        first = [f"ha{i:02d}" for i in range(30)]
        uris = {m: write_artifact(artifact_root, namespace, m, 1) for m in first}
        await asyncio.gather(
            *(
                kube.create(MODEL_VERSIONS, namespace, version(f"{m}-v1", m, 1, uris[m]))
                for m in first
            )
        )
        running = await wait_phase(kube, namespace, "ha", ("Running",), within=60)
        run_id = running["status"]["runId"]
        assert total(ports["a"], "kubeloop_reconcile_total") > 0
        assert total(ports["a"], "kubeloop_daemons") == 1  # the training run's
        assert total(ports["b"], "kubeloop_reconcile_total") == 0, "the standby reconciled"
        assert total(ports["b"], "kubeloop_daemons") == 0

        procs["a"].send_signal(signal.SIGKILL)  # mid-run: no goodbye in the peering object
        procs["a"].wait(10)
        killed = time.monotonic()
        later = [f"hb{i:02d}" for i in range(10)]  # created while nobody is active
        uris |= {m: write_artifact(artifact_root, namespace, m, 1) for m in later}
        await asyncio.gather(
            *(
                kube.create(MODEL_VERSIONS, namespace, version(f"{m}-v1", m, 1, uris[m]))
                for m in later
            )
        )

        async def b_resumed() -> bool:
            return logged(logs["b"], RESUMED)

        await eventually(
            b_resumed, within=LIFETIME + 30, interval=0.2, what="the standby to resume"
        )
        takeover = time.monotonic() - killed
        print(f"takeover {takeover:.1f}s (peering lifetime {LIFETIME}s)")
        assert takeover <= LIFETIME + 10, takeover

        await assert_finished_once(kube, namespace, peered, run_id, first + later)
        assert total(ports["b"], "kubeloop_reconcile_total") > 0
        assert total(ports["b"], "kubeloop_daemons") == 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
