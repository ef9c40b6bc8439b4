"""Integration fixtures: one real control plane per session, a fresh namespace per test, the
real operator (kopf.testing.KopfRunner, or a subprocess where it must be killed).

Set KUBELOOP_TEST_KUBECONFIG to run against an existing cluster instead of the local one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hack import prometheus as prometheus_mod
from hack.cluster import cluster as cluster_mod
from kopf.testing import KopfRunner

from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.backends.kube import NAMESPACES, KubeClient, NotFound, connection_info
from kubeloop.backends.serving_local import LocalServingBackend
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class LocalCluster:
    kubeconfig: Path
    bin_dir: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if check and result.returncode:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    existing = os.environ.get("KUBELOOP_TEST_KUBECONFIG")
    bin_dir = cluster_mod.ensure_binaries()
    if existing:
        os.environ["KUBECONFIG"] = existing
        yield LocalCluster(Path(existing), bin_dir)
        return
    # Separate directories let several test sessions run side by side.
    state = Path(os.environ.get("KUBELOOP_TEST_CLUSTER_DIR", cluster_mod.CACHE / "cluster-test"))
    cluster_mod.down(state, purge=True)  # a fresh etcd every session
    started = time.monotonic()
    local = cluster_mod.up(state)
    print(f"\nlocal control plane ready in {time.monotonic() - started:.1f}s at {local.server}")
    os.environ["KUBECONFIG"] = str(local.kubeconfig)
    try:
        yield LocalCluster(local.kubeconfig, bin_dir)
    finally:
        cluster_mod.down(state, purge=True)


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> LocalCluster:
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    return cluster


@pytest.fixture
async def kube(crds: LocalCluster) -> AsyncIterator[KubeClient]:
    async with KubeClient(connection_info(), field_manager="kubeloop-tests") as client:
        yield client


@pytest.fixture
async def namespace(kube: KubeClient) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await kube.create(
        NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    yield name
    with contextlib.suppress(NotFound):
        await kube.delete(NAMESPACES, None, name)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalExecutor]:
    """The local executor (kfp.local in detached runner processes), stopped after the test."""
    executor = LocalExecutor(tmp_path / "state")
    yield executor
    executor.stop_all()


@pytest.fixture
def artifact_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    monkeypatch.setenv("KUBELOOP_ARTIFACT_ROOT", str(root))
    monkeypatch.setenv("KUBELOOP_METRICS_PORT", "0")
    return root


@pytest.fixture
def operator(namespace: str, artifact_root: Path) -> Iterator[KopfRunner]:
    """The real operator, in-process, watching only this test's namespace."""
    args = ["run", "--standalone", "--namespace", namespace, "-m", "kubeloop.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-4000:]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[prometheus_mod.Prom]:
    state = tmp_path_factory.mktemp("prometheus")
    prom = prometheus_mod.up(state, targets_dir=state / "targets", scrape_interval="1s")
    try:
        yield prom
    finally:
        prometheus_mod.down(state)


@pytest.fixture
def serving_env(
    prometheus: prometheus_mod.Prom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    state = tmp_path / "state"
    monkeypatch.setenv("KUBELOOP_PROMETHEUS_URL", prometheus.url)
    monkeypatch.setenv("KUBELOOP_SCRAPE_TARGETS_DIR", str(prometheus.targets_dir))
    monkeypatch.setenv("KUBELOOP_STATE_DIR", str(state))
    yield state
    # The model servers outlive the operator by design; the test must not leak them.
    LocalServingBackend(state, prometheus.targets_dir).stop_all()


def operator_process(
    namespace: str, artifact_root: Path, log: Path, *, metrics_port: int = 0, liveness: str = ""
) -> subprocess.Popen[bytes]:
    """The operator as its own process, started the way the chart starts it (so a test can
    SIGKILL it, or scrape its endpoints)."""
    env = {
        **os.environ,
        "KUBELOOP_ARTIFACT_ROOT": str(artifact_root),
        "KUBELOOP_METRICS_PORT": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubeloop",
                "operator",
                "-n",
                namespace,
                f"--liveness={liveness}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def free_port() -> int:
    return int(cluster_mod._free_port())


async def eventually(
    check: Callable[[], Awaitable[Any]],
    *,
    within: float = 30,
    interval: float = 0.2,
    what: str = "condition",
) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with the last value."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached in {within}s; last: {json.dumps(last)[:2000]}")


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions", []):
        if cond["type"] == type_:
            return dict(cond)
    return None
