"""Hostile tenants, refused at the door: the operator's admission webhook registered on the real
API server refuses what a schema cannot express, naming the field; without the webhook the
operator refuses the same resources as Ready=False naming the same field, reads no other
tenant's file, leaves no child behind and keeps running.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from kubeloop.api.drift_policy import DriftPolicy
from kubeloop.backends.kube import (
    DRIFT_POLICIES,
    MODEL_DEPLOYMENTS,
    MODEL_VERSIONS,
    TRAINING_RUNS,
    WEBHOOK_CONFIGURATIONS,
    ApiError,
    Kind,
    KubeClient,
    NotFound,
)
from kubeloop.handlers.refusals import drift_policy as refusals_of
from kubeloop.handlers.startup import Context
from kubeloop.settings import Settings
from tests.integration.conftest import condition, eventually, free_port

KINDS = {
    "TrainingRun": TRAINING_RUNS,
    "ModelVersion": MODEL_VERSIONS,
    "ModelDeployment": MODEL_DEPLOYMENTS,
    "DriftPolicy": DRIFT_POLICIES,
}


def training_run(
    name: str, uri: str, *, extra: list[dict[str, str]] | None = None, **spec: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {"uri": uri, "target": "y", "format": "csv"}
    if extra:
        data["extra"] = extra
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {"data": data, "registration": {"modelName": "m"}, **spec},
    }


def model_version(name: str, uri: str) -> dict[str, Any]:
    model, _, number = name.rpartition("-v")
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": {"modelName": model, "version": int(number), "artifact": {"uri": uri}},
    }


def deployment(name: str, query: str = "", **rollout: Any) -> dict[str, Any]:
    if query:
        rollout["analysis"] = {"metrics": [{"name": "custom", "query": query, "max": 1}]}
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"modelVersion": {"name": "m-v1"}}, "rollout": rollout},
    }


def drift_policy(name: str, signals: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "DriftPolicy",
        "metadata": {"name": name},
        "spec": {"target": {"name": "md"}, "signals": signals, **spec},
    }


def promql_signal(query: str) -> list[dict[str, Any]]:
    return [{"name": "q", "type": "promql", "query": query, "threshold": 1}]


@pytest.fixture
def tenants(artifact_root: Path, namespace: str) -> dict[str, Path]:
    """Two tenants' folders: ours (the test's namespace) and a victim's, with data in both,
    and symlinks in ours that point into the victim's."""
    ours, victim = artifact_root / namespace, artifact_root / "victim"
    for folder in (ours, victim):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.csv").write_text("x,y\n1,0\n2,1\n3,0\n4,1\n")
        (folder / "model").mkdir(exist_ok=True)
        (folder / "model" / "model.pt").write_bytes(b"weights")
    (ours / "link.csv").symlink_to(victim / "data.csv")
    (ours / "linked-dir").symlink_to(victim)
    return {"ours": ours, "victim": victim}


def hostile(ours: Path, victim: Path) -> list[tuple[str, dict[str, Any], str]]:
    """(id, resource, the field its refusal must name). Each passes the CRD schema: only code
    can refuse it."""
    other = f"file://{victim}/data.csv"
    return [
        ("tr-other-tenant-file", training_run("a", other), "spec.data.uri"),
        ("tr-etc-passwd", training_run("b", "file:///etc/passwd"), "spec.data.uri"),
        (
            "tr-dot-dot",
            training_run("c", f"file://{ours}/../victim/data.csv"),
            "spec.data.uri",
        ),
        ("tr-symlink-file", training_run("d", f"file://{ours}/link.csv"), "spec.data.uri"),
        (
            "tr-symlink-dir",
            training_run("e", f"file://{ours}/linked-dir/data.csv"),
            "spec.data.uri",
        ),
        ("tr-double-slash-root", training_run("f", f"file:///{ours}/data.csv"), "spec.data.uri"),
        (
            "tr-encoded-separator",
            training_run("g", f"file://{ours}%2F..%2Fvictim/data.csv"),
            "spec.data.uri",
        ),
        (
            "tr-encoded-dots",
            training_run("h", f"file://{ours}/%2e%2e/victim/data.csv"),
            "spec.data.uri",
        ),
        ("tr-object-store", training_run("i", "s3://victim-bucket/data.csv"), "spec.data.uri"),
        (
            "tr-object-store-credentials",
            training_run("l", "s3://user:pw@victim-bucket/data.csv"),
            "spec.data.uri",
        ),
        (
            "tr-extra-source",
            training_run("j", f"file://{ours}/data.csv", extra=[{"uri": other}]),
            "spec.data.extra[0].uri",
        ),
        (
            "tr-cron-minute-61",
            training_run("k", f"file://{ours}/data.csv", schedule="61 * * * *"),
            "spec.schedule",
        ),
        ("mv-other-tenant", model_version("m-v1", f"file://{victim}/model"), "spec.artifact.uri"),
        (
            "mv-symlinked-artifact",
            model_version("m-v2", f"file://{ours}/linked-dir/model"),
            "spec.artifact.uri",
        ),
        (
            "md-other-namespace",
            deployment("md-a", 'sum(rate(x{namespace="victim"}[5m]))'),
            "spec.rollout.analysis.metrics[0].query",
        ),
        (
            "md-namespace-not-equal",
            deployment("md-b", 'sum(rate(x{namespace!="nobody"}[5m]))'),
            "spec.rollout.analysis.metrics[0].query",
        ),
        (
            "md-or-on",
            deployment("md-c", 'x or on() y{namespace="victim"}'),
            "spec.rollout.analysis.metrics[0].query",
        ),
        (
            "md-any-name-any-namespace",
            deployment("md-d", '{__name__=~".+", namespace=~".+"}'),
            "spec.rollout.analysis.metrics[0].query",
        ),
        (
            "md-subquery",
            deployment("md-e", 'max_over_time(x{namespace="victim"}[10m:1m])'),
            "spec.rollout.analysis.metrics[0].query",
        ),
        (
            "md-malformed",
            deployment("md-f", "sum(rate(x[5m])"),
            "spec.rollout.analysis.metrics[0].query",
        ),
        (
            "dp-other-namespace",
            drift_policy("dp-a", promql_signal('x{namespace="victim"}')),
            "spec.signals[0].query",
        ),
        (
            "dp-regex-namespace",
            drift_policy("dp-b", promql_signal('x{namespace=~"vic.*"} > 0')),
            "spec.signals[0].query",
        ),
    ]


async def apply(kube: KubeClient, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    kind: Kind = KINDS[obj["kind"]]
    return await kube.request(
        "POST", kind.path(namespace), body=obj, params={"fieldValidation": "Strict"}
    )


@pytest.fixture
async def webhook(
    kube: KubeClient,
    namespace: str,
    artifact_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[KopfRunner]:
    """The operator with its webhook registered on the API server (for this namespace only)."""
    port = free_port()
    monkeypatch.setenv("KUBELOOP_WEBHOOK_PORT", str(port))
    monkeypatch.setenv("KUBELOOP_WEBHOOK_ADDR", "127.0.0.1")
    monkeypatch.setenv("KUBELOOP_WEBHOOK_REGISTER", "true")
    monkeypatch.setenv("KUBELOOP_NAMESPACES", json.dumps([namespace]))
    monkeypatch.setenv("KUBELOOP_STATE_DIR", str(tmp_path / "state"))
    name = f"kubeloop-local-{namespace}"
    args = ["run", "--standalone", "--namespace", namespace, "-m", "kubeloop.handlers"]
    try:
        with KopfRunner(args, timeout=60) as runner:
            probe = training_run("probe", "file:///etc/passwd")

            async def refusing() -> bool:
                try:
                    await apply(kube, namespace, probe)
                except ApiError as exc:
                    return "denied the request" in exc.message
                await kube.delete(TRAINING_RUNS, namespace, "probe")  # before the webhook
                return False

            await eventually(refusing, within=60, what="the webhook answering")
            yield runner
        assert runner.exception is None, runner.output[-4000:]
        with pytest.raises(NotFound):  # the operator removed its registration on the way out
            await kube.get(WEBHOOK_CONFIGURATIONS, None, name)
    finally:
        with contextlib.suppress(NotFound):
            await kube.delete(WEBHOOK_CONFIGURATIONS, None, name)


async def test_hostile_resources_are_refused_at_apply_naming_the_field(
    kube: KubeClient,
    namespace: str,
    artifact_root: Path,
    tenants: dict[str, Path],
    webhook: KopfRunner,
) -> None:
    cases = hostile(tenants["ours"], tenants["victim"])
    assert len(cases) >= 20
    for case, obj, field in cases:
        with pytest.raises(ApiError) as info:
            await apply(kube, namespace, obj)
        message = info.value.message
        assert info.value.status == 422, (case, info.value)
        assert "denied the request" in message, (case, message)
        assert field in message, (case, message)
    for kind in KINDS.values():  # nothing of it was stored
        assert await kube.list(kind, namespace) == [], kind


async def test_good_resources_and_the_operators_own_writes_pass_the_webhook(
    kube: KubeClient,
    namespace: str,
    artifact_root: Path,
    tenants: dict[str, Path],
    webhook: KopfRunner,
) -> None:
    ours = tenants["ours"]
    await apply(kube, namespace, model_version("m-v1", f"file://{ours}/model"))
    await apply(kube, namespace, deployment("md", 'sum(rate(x{version="{{version}}"}[5m]))'))
    signals = [{"name": "psi", "type": "psi", "feature": "*", "threshold": 0.2}]
    await apply(kube, namespace, drift_policy("dp", signals))
    # The operator's own writes pass: the version's status (kopf's record of the handled spec
    # rides in it), and the finalizer it puts on the deployment (an UPDATE of the object).
    mv = await eventually(
        lambda: _ready_version(kube, namespace, "m-v1"), within=60, what="m-v1 Ready"
    )
    assert "last-handled-configuration" in mv["status"]["kopf"]

    async def finalized() -> bool:
        md = await kube.get(MODEL_DEPLOYMENTS, namespace, "md")
        return "kubeloop.dev/finalizer" in md["metadata"].get("finalizers", [])

    await eventually(finalized, within=60, what="the deployment's finalizer")
    # A change of spec is judged again: an alias is fine, a query that escapes is not.
    await kube.patch(MODEL_VERSIONS, namespace, "m-v1", {"spec": {"aliases": ["latest"]}})
    escape = {"analysis": {"metrics": [{"name": "c", "query": 'x{namespace="b"}', "max": 1}]}}
    with pytest.raises(ApiError) as info:
        await kube.patch(MODEL_DEPLOYMENTS, namespace, "md", {"spec": {"rollout": escape}})
    assert "spec.rollout.analysis.metrics[0].query" in info.value.message
    # Deletes never reach the webhook.
    await kube.delete(DRIFT_POLICIES, namespace, "dp")


async def _ready_version(kube: KubeClient, namespace: str, name: str) -> dict[str, Any] | None:
    obj = await kube.get(MODEL_VERSIONS, namespace, name)
    return obj if (obj.get("status") or {}).get("phase") == "Ready" else None


async def test_without_the_webhook_the_operator_refuses_the_same_as_conditions(
    kube: KubeClient,
    namespace: str,
    artifact_root: Path,
    tenants: dict[str, Path],
    operator: KopfRunner,
) -> None:
    cases = hostile(tenants["ours"], tenants["victim"])
    for _, obj, _field in cases:
        await apply(kube, namespace, obj)  # no webhook: the API server takes them

    waiting: list[str] = []

    async def all_refused() -> bool:
        waiting.clear()
        for case, obj, field in cases:
            live = await kube.get(KINDS[obj["kind"]], namespace, obj["metadata"]["name"])
            ready = condition(live, "Ready") or {}
            if not (ready.get("status") == "False" and field in ready.get("message", "")):
                waiting.append(f"{case}: {ready.get('reason')} {ready.get('message', '')[:80]}")
        return not waiting

    try:
        await eventually(all_refused, within=90, what="every resource refused")
    except AssertionError as exc:
        raise AssertionError(f"not refused yet: {waiting}") from exc
    # Nothing ran for them: no pipeline run directory, no registered model, nothing served.
    runs = artifact_root / namespace / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    versions = [v["metadata"]["name"] for v in await kube.list(MODEL_VERSIONS, namespace)]
    assert sorted(versions) == ["m-v1", "m-v2"]  # the two refused ones, never Ready
    for md in await kube.list(MODEL_DEPLOYMENTS, namespace):
        assert not (md.get("status") or {}).get("stable", {}).get("modelVersion"), md["status"]
    # The operator still works: a good version of the tenant's own becomes Ready.
    await apply(kube, namespace, model_version("ok-v1", f"file://{tenants['ours']}/model"))
    assert await eventually(
        lambda: _ready_version(kube, namespace, "ok-v1"), within=60, what="ok-v1 Ready"
    )


async def test_a_drift_signal_on_a_feature_the_deployment_does_not_serve_is_refused(
    kube: KubeClient, namespace: str, artifact_root: Path, tenants: dict[str, Path]
) -> None:
    # No operator: the webhook's check is called as the webhook calls it, against the API
    # server, with the deployment's status written as the operator would have written it.
    mv = model_version("m-v1", f"file://{tenants['ours']}/model")
    mv["spec"]["reference"] = [
        {"name": "amount", "edges": [0, 10, 100], "fractions": [0.2, 0.5, 0.3]}
    ]
    await apply(kube, namespace, mv)
    await apply(kube, namespace, deployment("md"))
    await kube.patch(
        MODEL_DEPLOYMENTS,
        namespace,
        "md",
        {"status": {"stable": {"modelVersion": "m-v1", "weight": 100}}},
        subresource="status",
    )
    ctx = Context(Settings(), kube, None, None, {})  # type: ignore[arg-type]
    bad = drift_policy("dp", [{"name": "s", "type": "psi", "feature": "colour", "threshold": 0.2}])
    bad["metadata"]["namespace"] = namespace
    found = await refusals_of(ctx, DriftPolicy.parse(bad), served=True)
    assert len(found) == 1
    assert found[0].message.startswith("spec.signals[0].feature='colour'")
    assert "amount" in found[0].message
    good = drift_policy("dp", [{"name": "s", "type": "psi", "feature": "amount", "threshold": 0.2}])
    good["metadata"]["namespace"] = namespace
    assert await refusals_of(ctx, DriftPolicy.parse(good), served=True) == []
