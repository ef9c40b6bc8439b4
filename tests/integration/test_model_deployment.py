"""ModelDeployment end to end on the local backend: real model servers (kserve + torch), a
real traffic splitter, real Prometheus scraping them, and the real operator deciding.

Rollout intervals are a few seconds so the suite stays short; the logic is the same at 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hack import prometheus as prometheus_mod
from kopf.testing import KopfRunner

from kubeloop.backends.kube import MODEL_DEPLOYMENTS, MODEL_VERSIONS, KubeClient
from kubeloop.backends.prometheus import PrometheusClient
from kubeloop.contract.labels import APPROVE_ANNOTATION
from kubeloop.serving.samples import breast_cancer_rows, train_tabular_model, write_broken_model
from tests.integration.conftest import condition, eventually, operator_process

ROWS = breast_cancer_rows(16)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real models, trained once per module: two healthy versions and a broken one."""
    root = tmp_path_factory.mktemp("models")
    return {
        "v1": train_tabular_model(root / "v1", seed=1),
        "v2": train_tabular_model(root / "v2", seed=2),
        "v3": write_broken_model(root / "v3"),
    }


def version_doc(number: int, folder: Path, **spec: Any) -> dict[str, Any]:
    """A ModelVersion of the churn model whose artifact is ``folder``."""
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": f"churn-v{number}"},
        "spec": {
            "modelName": "churn",
            "version": number,
            "artifact": {"uri": f"file://{folder}"},
            **spec,
        },
    }


async def register(
    kube: KubeClient,
    namespace: str,
    root: Path,
    models: dict[str, Path],
    *names: str,
    **spec: Any,
) -> None:
    """Copy the trained models into the tenant's artifact prefix and register them."""
    for name in names:
        folder = root / namespace / "churn" / name
        shutil.copytree(models[name], folder, dirs_exist_ok=True)
        await kube.create(
            MODEL_VERSIONS,
            namespace,
            version_doc(int(name[1:]), folder, metrics={"f1": 0.95}, **spec),
        )


def deployment(version: str, **rollout: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "churn"},
        "spec": {
            "model": {"modelVersion": {"name": version}},
            "serving": {"backend": "local"},
            "rollout": {
                "steps": [20, 50, 100],
                "interval": "4s",
                "maxDuration": "10m",
                "analysis": {
                    "minRequests": 10,
                    "maxErrorRate": 0.05,
                    "maxP99LatencyMs": 3000,
                    "maxPredictionShift": 2.0,
                    "failureLimit": 1,
                    **rollout,
                },
            },
        },
    }


async def serve(kube: KubeClient, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Create the deployment and wait until its first version serves; return its status."""
    await kube.create(MODEL_DEPLOYMENTS, namespace, doc)
    version = doc["spec"]["model"]["modelVersion"]["name"]
    status: dict[str, Any] = await eventually(
        lambda: serving(kube, namespace, version), within=90, what=f"{version} serving"
    )
    return status


async def point_to(kube: KubeClient, namespace: str, version: str) -> None:
    """Change the version the deployment asks for (what a GitOps commit would do)."""
    await kube.patch(
        MODEL_DEPLOYMENTS,
        namespace,
        "churn",
        {"spec": {"model": {"modelVersion": {"name": version}}}},
    )


async def md_status(kube: KubeClient, namespace: str) -> dict[str, Any]:
    status: dict[str, Any] = (await kube.get(MODEL_DEPLOYMENTS, namespace, "churn")).get(
        "status"
    ) or {}
    return status


async def serving(kube: KubeClient, namespace: str, version: str) -> dict[str, Any] | None:
    st = await md_status(kube, namespace)
    ok = (
        st.get("stable", {}).get("modelVersion") == version
        and st.get("phase") == "Serving"
        and st.get("url")
    )
    return st if ok else None


class Traffic:
    """Bounded client load on 127.0.0.1: V2 requests at a steady rate until stopped."""

    def __init__(self, url: str, rate: float = 40) -> None:
        self.url, self.rate = url, rate
        self.codes: Counter[int] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        body = {
            "id": "t",
            "inputs": [
                {"name": "input-0", "shape": [1, len(ROWS[0])], "datatype": "FP32", "data": ROWS[0]}
            ],
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
            for _ in range(20_000):  # bounded even if never stopped
                try:
                    async with client.post(self.url, json=body) as resp:
                        await resp.read()
                        self.codes[resp.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    self.codes[0] += 1
                await asyncio.sleep(1 / self.rate)

    def __enter__(self) -> Traffic:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


@contextlib.asynccontextmanager
async def watching_weights(kube: KubeClient, namespace: str) -> AsyncIterator[list[int]]:
    """Record every canary weight the status shows while the block runs."""
    seen: list[int] = []

    async def poll() -> None:
        while True:
            seen.append(int((await md_status(kube, namespace)).get("canary", {}).get("weight", 0)))
            await asyncio.sleep(0.2)

    task = asyncio.create_task(poll())
    try:
        yield seen
    finally:
        task.cancel()


async def test_healthy_canary_is_promoted_through_every_step_and_moves_production(
    serving_env: Path,
    kube: KubeClient,
    namespace: str,
    operator: KopfRunner,
    artifact_root: Path,
    models: dict[str, Path],
    prometheus: prometheus_mod.Prom,
) -> None:
    await register(kube, namespace, artifact_root, models, "v1", "v2")
    st = await serve(kube, namespace, deployment("churn-v1"))
    with Traffic(st["url"]) as traffic:
        async with watching_weights(kube, namespace) as weights:
            await point_to(kube, namespace, "churn-v2")
            st = await eventually(
                lambda: serving(kube, namespace, "churn-v2"), within=120, what="v2 promoted"
            )
    assert [w for w in dict.fromkeys(weights) if w] == [20, 50, 100]
    assert st["history"][-1]["result"] == "Promoted"
    assert traffic.codes[200] > 50
    assert set(traffic.codes) == {200}, traffic.codes
    passed = {(r["step"], r["check"]) for r in st["analysis"] if r["verdict"] == "Pass"}
    assert {(0, "errorRate"), (1, "errorRate"), (2, "errorRate")} <= passed
    v2 = await kube.get(MODEL_VERSIONS, namespace, "churn-v2")
    assert "production" in v2["spec"]["aliases"]
    # Both versions really served requests (the split is real, not simulated).

    prom = PrometheusClient(prometheus.url, timeout=5)
    for version in ("churn-v1", "churn-v2"):
        # v1's server is gone after the promotion: look back over the whole test.
        count = await prom.query_value(
            "sum(max_over_time(kubeloop_requests_total"
            f'{{namespace="{namespace}",version="{version}"}}[10m]))'
        )
        assert count is not None, version
        assert count > 0, version


async def test_broken_canary_is_rolled_back_and_never_exceeds_its_step(
    serving_env: Path,
    kube: KubeClient,
    namespace: str,
    operator: KopfRunner,
    artifact_root: Path,
    models: dict[str, Path],
) -> None:
    await register(kube, namespace, artifact_root, models, "v1", "v3")
    st = await serve(kube, namespace, deployment("churn-v1"))
    with Traffic(st["url"]) as traffic:
        async with watching_weights(kube, namespace) as weights:
            await point_to(kube, namespace, "churn-v3")

            async def rolled_back() -> dict[str, Any] | None:
                s = await md_status(kube, namespace)
                return s if s.get("phase") == "RolledBack" else None

            st = await eventually(rolled_back, within=90, what="rollback")
        before = traffic.codes[200]
        await asyncio.sleep(2)
        assert traffic.codes[200] > before  # v1 keeps serving all traffic afterwards
    assert max(weights) == 20
    assert st["stable"]["modelVersion"] == "churn-v1"
    assert st["canary"].get("modelVersion") is None
    assert "errorRate" in st["history"][-1]["reason"]
    md = await kube.get(MODEL_DEPLOYMENTS, namespace, "churn")
    degraded = condition(md, "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "RolledBack"


async def test_a_canary_without_traffic_is_held_never_promoted(
    serving_env: Path,
    kube: KubeClient,
    namespace: str,
    operator: KopfRunner,
    artifact_root: Path,
    models: dict[str, Path],
) -> None:
    await register(kube, namespace, artifact_root, models, "v1", "v2")
    await serve(kube, namespace, deployment("churn-v1"))
    await point_to(kube, namespace, "churn-v2")

    async def analysed_three_times() -> dict[str, Any] | None:
        s = await md_status(kube, namespace)
        return s if len({r["time"] for r in s.get("analysis", [])}) >= 3 else None

    st = await eventually(analysed_three_times, within=90, what="three analyses")
    assert st["canary"]["modelVersion"] == "churn-v2"
    assert st["canary"]["weight"] == 20
    assert st["stable"]["modelVersion"] == "churn-v1"
    assert {r["verdict"] for r in st["analysis"]} == {"Inconclusive"}


async def test_manual_approval_holds_the_canary_before_the_last_step_until_annotated(
    serving_env: Path,
    kube: KubeClient,
    namespace: str,
    operator: KopfRunner,
    artifact_root: Path,
    models: dict[str, Path],
) -> None:
    await register(kube, namespace, artifact_root, models, "v1", "v2")
    doc = deployment("churn-v1")
    doc["spec"]["rollout"]["approval"] = "manual"
    st = await serve(kube, namespace, doc)
    with Traffic(st["url"]):
        await point_to(kube, namespace, "churn-v2")

        async def awaiting() -> dict[str, Any] | None:
            cond = condition(await kube.get(MODEL_DEPLOYMENTS, namespace, "churn"), "Progressing")
            return cond if cond and cond["reason"] == "AwaitingApproval" else None

        cond = await eventually(awaiting, within=90, what="AwaitingApproval")
        command = f"kubectl annotate modeldeployment churn {APPROVE_ANNOTATION}=churn-v2"
        assert command in cond["message"]
        await asyncio.sleep(10)  # more than two intervals: the analysis passes, it stays held
        held = await md_status(kube, namespace)
        assert (held["canary"]["weight"], held["currentStep"], held["phase"]) == (
            50,
            1,
            "Progressing",
        )
        await kube.patch(
            MODEL_DEPLOYMENTS,
            namespace,
            "churn",
            {"metadata": {"annotations": {APPROVE_ANNOTATION: "churn-v2"}}},
        )
        st = await eventually(
            lambda: serving(kube, namespace, "churn-v2"), within=60, what="promoted once approved"
        )
    assert st["history"][-1]["result"] == "Promoted"
    assert 2 in {r["step"] for r in st["analysis"] if r["verdict"] == "Pass"}  # 100 % was judged
    md = await kube.get(MODEL_DEPLOYMENTS, namespace, "churn")
    assert APPROVE_ANNOTATION not in (md["metadata"].get("annotations") or {})  # used up


async def test_operator_restart_mid_rollout_resumes_at_the_recorded_step(
    kube: KubeClient,
    namespace: str,
    artifact_root: Path,
    models: dict[str, Path],
    serving_env: Path,
    tmp_path: Path,
) -> None:
    await register(kube, namespace, artifact_root, models, "v1", "v2")
    log = tmp_path / "operator.log"
    env_root = artifact_root
    first = operator_process(namespace, env_root, log)
    try:
        st = await serve(kube, namespace, deployment("churn-v1"))
        with Traffic(st["url"]):
            await point_to(kube, namespace, "churn-v2")

            async def at_second_step() -> bool:
                return (await md_status(kube, namespace)).get("currentStep") == 1

            await eventually(at_second_step, within=90, what="step 1")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            recorded = await md_status(kube, namespace)
            second = operator_process(namespace, env_root, log)
            try:
                st = await eventually(
                    lambda: serving(kube, namespace, "churn-v2"),
                    within=120,
                    what="promoted after restart",
                )
            finally:
                second.terminate()
                second.wait(20)
    finally:
        if first.poll() is None:
            first.kill()
    assert recorded["currentStep"] == 1
    steps = [r["step"] for r in st["analysis"] if r["check"] == "errorRate"]
    assert 0 not in steps[steps.index(1) :]  # resumed at step 1, did not start over
    servers = list((serving_env / "serving" / namespace / "churn" / "servers").glob("*.json"))
    assert [p.stem for p in servers] == ["churn-v2"]  # v1 stopped, nothing started twice
    assert (serving_env / "serving" / namespace / "churn" / "router.json").exists()


async def test_bad_targets_degrade_while_the_stable_version_keeps_serving(
    serving_env: Path,
    kube: KubeClient,
    namespace: str,
    operator: KopfRunner,
    artifact_root: Path,
    models: dict[str, Path],
) -> None:
    v1_signature = {"inputs": [{"name": f"f{i}"} for i in range(30)]}
    await register(kube, namespace, artifact_root, models, "v1", signature=v1_signature)
    st = await serve(kube, namespace, deployment("churn-v1"))
    # A version with another input signature than the stable one's.
    await register(
        kube,
        namespace,
        artifact_root,
        models,
        "v2",
        signature={"inputs": [{"name": "only_feature"}]},
    )

    async def degraded(reason: str) -> dict[str, Any] | None:
        md = await kube.get(MODEL_DEPLOYMENTS, namespace, "churn")
        cond = condition(md, "Degraded")
        return md if cond and cond["status"] == "True" and cond["reason"] == reason else None

    for version, reason in (
        ("churn-v9", "ModelVersionNotFound"),
        ("churn-v2", "IncompatibleSignature"),
    ):
        await point_to(kube, namespace, version)
        md = await eventually(functools.partial(degraded, reason), within=30, what=reason)
        assert version in condition(md, "Degraded")["message"]  # type: ignore[index]
        assert md["status"]["stable"]["modelVersion"] == "churn-v1"
        assert md["status"]["canary"].get("modelVersion") is None
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                st["url"],
                json={
                    "id": "x",
                    "inputs": [
                        {"name": "x", "shape": [1, 30], "datatype": "FP32", "data": ROWS[0]}
                    ],
                },
            ) as resp,
        ):
            assert resp.status == 200  # the stable version keeps serving all traffic


async def test_a_canary_that_cannot_load_is_reported_and_times_out(
    serving_env: Path,
    kube: KubeClient,
    namespace: str,
    operator: KopfRunner,
    artifact_root: Path,
    models: dict[str, Path],
) -> None:
    await register(kube, namespace, artifact_root, models, "v1")
    empty = artifact_root / namespace / "churn" / "v2"
    empty.mkdir(parents=True)  # registered, but holds no model
    await kube.create(MODEL_VERSIONS, namespace, version_doc(2, empty))
    doc = deployment("churn-v1")
    doc["spec"]["rollout"]["maxDuration"] = "20s"
    await serve(kube, namespace, doc)
    await point_to(kube, namespace, "churn-v2")

    async def crash_reported() -> str | None:
        cond = condition(await kube.get(MODEL_DEPLOYMENTS, namespace, "churn"), "Degraded")
        return cond["message"] if cond and cond["reason"] == "ServingFailed" else None

    message = await eventually(crash_reported, within=60, what="ServingFailed")
    assert "churn-v2 exited" in message
    assert "model.json" in message  # the runtime's own reason
    st = await eventually(
        lambda: _phase(kube, namespace, "RolledBack"), within=60, what="maxDuration rollback"
    )
    assert "maxDuration" in st["history"][-1]["reason"]
    assert st["stable"]["modelVersion"] == "churn-v1"


async def _phase(kube: KubeClient, namespace: str, phase: str) -> dict[str, Any] | None:
    st = await md_status(kube, namespace)
    return st if st.get("phase") == phase else None
