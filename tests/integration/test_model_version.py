"""The real operator reconciles ModelVersions in a real API server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import kopf
from kopf.testing import KopfRunner

from kubeloop.backends.kube import (
    CONFIGMAPS,
    EVENTS,
    MODEL_VERSIONS,
    PVCS,
    ApiError,
    KubeClient,
    NotFound,
)
from kubeloop.contract.artifact import digest
from tests.integration.conftest import (
    LocalCluster,
    condition,
    eventually,
    operator_process,
)


def version(
    name: str, model: str, number: int, uri: str, *, aliases: list[str] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": {
            "modelName": model,
            "version": number,
            "artifact": {"uri": uri},
            "aliases": aliases or [],
            "metrics": {"f1": 0.9 + number / 1000},
            **spec,
        },
    }


def write_artifact(root: Path, namespace: str, model: str, number: int) -> str:
    folder = root / namespace / model / f"v{number}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(f"weights of {model} v{number}".encode())
    return f"file://{folder}"


async def get(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    return await kube.get(MODEL_VERSIONS, namespace, name)


async def ready(kube: KubeClient, namespace: str, name: str) -> dict[str, Any] | None:
    obj = await get(kube, namespace, name)
    cond = condition(obj, "Ready")
    settled = (
        cond
        and cond["status"] == "True"
        and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
    )
    return obj if settled else None


async def reasons_of_events(kube: KubeClient, namespace: str, name: str) -> list[str]:
    items = await kube.list(EVENTS, namespace)
    return [e["reason"] for e in items if e["involvedObject"]["name"] == name]


async def test_becomes_ready_with_conditions_columns_and_events(
    kube: KubeClient, namespace: str, operator: KopfRunner, artifact_root: Path, crds: LocalCluster
) -> None:
    uri = write_artifact(artifact_root, namespace, "iris", 1)
    doc = version("iris-v1", "iris", 1, uri, aliases=["production"])
    doc["spec"]["artifact"]["sha256"] = digest(Path(uri.removeprefix("file://")))
    await kube.create(MODEL_VERSIONS, namespace, doc)
    obj = await eventually(lambda: ready(kube, namespace, "iris-v1"), what="iris-v1 Ready")

    status = obj["status"]
    assert status["phase"] == "Ready"
    assert status["aliases"] == ["production"]
    assert status["artifactVerified"] is True
    assert status["primaryMetric"] == "f1=0.901"
    ready_cond = condition(obj, "Ready")
    assert ready_cond is not None
    assert ready_cond["reason"] == "Registered"
    assert ready_cond["observedGeneration"] == 1
    degraded = condition(obj, "Degraded")
    assert degraded is not None
    assert degraded["status"] == "False"

    table = crds.kubectl("get", "mv", "-n", namespace, "-o", "wide").stdout.splitlines()
    header = table[0].split()
    assert header[:5] == ["NAME", "MODEL", "VERSION", "ALIASES", "METRIC"]
    row = dict(zip(header, table[1].split(), strict=False))
    assert row["MODEL"] == "iris"
    assert row["VERSION"] == "1"
    assert row["READY"] == "True"
    assert row["PHASE"] == "Ready"
    assert row["REASON"] == "Registered"
    assert "iris-v1" in crds.kubectl("get", "kubeloop", "-n", namespace).stdout

    await eventually(
        lambda: registry_index(kube, namespace, "iris", aliases={"production": "iris-v1"}),
        what="registry index",
    )
    index = await kube.get(CONFIGMAPS, namespace, "kubeloop-registry-iris")
    assert index["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    events = await eventually(lambda: reasons_of_events(kube, namespace, "iris-v1"), what="events")
    assert events == ["AliasClaimed"]  # becoming Ready is routine: no Event for it

    # Changing an alias re-reconciles; Ready's lastTransitionTime does not move.
    await kube.patch(MODEL_VERSIONS, namespace, "iris-v1", {"spec": {"aliases": ["latest"]}})
    obj2 = await eventually(lambda: ready(kube, namespace, "iris-v1"), what="generation 2")
    assert obj2["status"]["aliases"] == ["latest"]
    ready2 = condition(obj2, "Ready")
    assert ready2 is not None
    assert ready2["observedGeneration"] == 2
    assert ready2["lastTransitionTime"] == ready_cond["lastTransitionTime"]


async def test_a_version_costs_one_write_on_the_happy_path(
    kube: KubeClient,
    namespace: str,
    operator: KopfRunner,
    artifact_root: Path,
) -> None:
    """kopf's record of the handled spec rides in the status write (no annotation patch), and
    becoming Ready posts no Event: one operator write per version, and no second pass. Counted
    in this namespace only: every write to a version is one MODIFIED event on its watch."""
    models = [f"w{i:02d}" for i in range(20)]
    uris = {m: write_artifact(artifact_root, namespace, m, 1) for m in models}
    seen: dict[str, list[str]] = {}

    async def listed() -> str:
        with contextlib.suppress(ApiError):  # 429 while a fresh server's storage initialises
            body = await kube.request("GET", MODEL_VERSIONS.path(namespace))
            return str(body["metadata"]["resourceVersion"])
        return ""

    since = await eventually(listed, what="the versions listed")

    async def record() -> None:
        async for type_, obj in kube.watch(
            MODEL_VERSIONS, namespace, resource_version=since, timeout_seconds=120
        ):
            seen.setdefault(obj["metadata"]["name"], []).append(type_)

    watching = asyncio.create_task(record())
    try:
        await asyncio.gather(
            *(
                kube.create(MODEL_VERSIONS, namespace, version(f"{m}-v1", m, 1, uris[m]))
                for m in models
            )
        )
        for m in models:
            await eventually(
                functools.partial(ready, kube, namespace, f"{m}-v1"), what=f"{m} Ready"
            )
        await asyncio.sleep(3)  # a second pass, or an Event posted in the background, would show
    finally:
        watching.cancel()
    assert seen == {f"{m}-v1": ["ADDED", "MODIFIED"] for m in models}, seen
    assert await kube.list(EVENTS, namespace) == []  # no routine Event
    obj = await get(kube, namespace, "w00-v1")
    assert "kopf" not in json.dumps(obj["metadata"].get("annotations", {}))
    assert "kubeloop.dev/last-handled-configuration" not in obj["metadata"].get("annotations", {})
    assert json.loads(obj["status"]["kopf"]["last-handled-configuration"])["spec"]["version"] == 1


async def test_an_older_operators_annotations_migrate_to_the_status(
    kube: KubeClient, namespace: str, artifact_root: Path, tmp_path: Path
) -> None:
    """A version handled by an operator that kept kopf's state in annotations: the new one
    reads it (no second creation), moves it into the status and removes the annotation."""
    uri = write_artifact(artifact_root, namespace, "old", 1)
    created = await kube.create(MODEL_VERSIONS, namespace, version("old-v1", "old", 1, uri))
    legacy = kopf.AnnotationsDiffBaseStorage(
        prefix="kubeloop.dev", key="last-handled-configuration"
    )
    essence = legacy.build(body=kopf.Body(created))  # type: ignore[arg-type]
    key = "kubeloop.dev/last-handled-configuration"
    annotations = {key: json.dumps(essence), "kubeloop.dev/kopf-managed": "yes"}
    await kube.patch(
        MODEL_VERSIONS, namespace, "old-v1", {"metadata": {"annotations": annotations}}
    )
    proc = operator_process(namespace, artifact_root, tmp_path / "operator.log")
    try:

        async def migrated() -> dict[str, Any] | None:
            obj = await get(kube, namespace, "old-v1")
            kept = obj["metadata"].get("annotations", {})
            moved = "kopf" in (obj.get("status") or {}) and not set(annotations) & set(kept)
            # Two resume handlers run in turn: the migration, then the reconcile (Ready).
            ready = (condition(obj, "Ready") or {}).get("status") == "True"
            return obj if moved and ready else None

        obj = await eventually(migrated, within=60, what="the annotation moved to the status")
    finally:
        proc.terminate()
        proc.wait(30)
    assert json.loads(obj["status"]["kopf"]["last-handled-configuration"]) == essence
    log = (tmp_path / "operator.log").read_text()
    assert "Creation is processed" not in log, "the migrated version was handled as new"


async def test_a_restart_writes_nothing_to_versions_that_are_already_right(
    kube: KubeClient, namespace: str, artifact_root: Path, tmp_path: Path
) -> None:
    """kopf resumes every object when an operator starts; a version that is already Ready
    with its diff-base in the status is left untouched: no write, so a restart of an operator
    holding thousands of versions is not thousands of writes (nor as many watch events); nor
    is a model's index ConfigMap rewritten when it already says what it should."""
    models = [f"r{i:02d}" for i in range(12)]
    uris = {m: write_artifact(artifact_root, namespace, m, 1) for m in models}
    log = tmp_path / "operator.log"
    first = operator_process(namespace, artifact_root, log)
    try:
        await asyncio.gather(
            *(
                kube.create(MODEL_VERSIONS, namespace, version(f"{m}-v1", m, 1, uris[m]))
                for m in models
            )
        )
        for m in models:
            await eventually(
                functools.partial(ready, kube, namespace, f"{m}-v1"), what=f"{m} Ready"
            )
    finally:
        first.terminate()
        first.wait(30)
    seen: list[tuple[str, str, str]] = []

    async def record(kind: Any, since: str) -> None:
        async for type_, obj in kube.watch(
            kind, namespace, resource_version=since, timeout_seconds=120
        ):
            seen.append((type_, obj["kind"], obj["metadata"]["name"]))

    # Each watch from the version its list showed: nothing written after it can slip by.
    listed = {
        kind: str((await kube.request("GET", kind.path(namespace)))["metadata"]["resourceVersion"])
        for kind in (MODEL_VERSIONS, CONFIGMAPS)
    }
    watching = asyncio.gather(*(record(kind, since) for kind, since in listed.items()))
    before = log.read_text().count("Resuming is processed")
    second = operator_process(namespace, artifact_root, log)
    try:

        async def resumed() -> bool:
            return log.read_text().count("Resuming is processed") - before >= len(models)

        await eventually(resumed, within=60, what="every version resumed")
        await asyncio.sleep(3)  # a write made after the handler would show by now
    finally:
        second.terminate()
        second.wait(30)
        watching.cancel()
    assert seen == [], seen


async def test_artifact_outside_the_tenant_prefix_fails_with_a_reason(
    kube: KubeClient, namespace: str, operator: KopfRunner, artifact_root: Path
) -> None:
    uri = write_artifact(artifact_root, "someone-else", "iris", 1)
    await kube.create(MODEL_VERSIONS, namespace, version("iris-v1", "iris", 1, uri))

    async def failed() -> dict[str, Any] | None:
        obj = await get(kube, namespace, "iris-v1")
        cond = condition(obj, "Ready")
        return obj if cond and cond["status"] == "False" else None

    obj = await eventually(failed, what="Ready=False")
    cond = condition(obj, "Ready")
    assert cond is not None
    assert cond["reason"] == "ArtifactOutsideTenantPrefix"
    assert "spec.artifact.uri" in cond["message"]
    assert namespace in cond["message"]
    assert obj["status"]["phase"] == "Failed"
    events = await eventually(
        lambda: reasons_of_events(kube, namespace, "iris-v1"), what="warning event"
    )
    assert "ArtifactOutsideTenantPrefix" in events


async def test_missing_artifact_waits_then_registers_when_it_appears(
    kube: KubeClient, namespace: str, operator: KopfRunner, artifact_root: Path
) -> None:
    uri = f"file://{artifact_root / namespace / 'late' / 'v1'}"
    await kube.create(MODEL_VERSIONS, namespace, version("late-v1", "late", 1, uri))

    async def pending() -> dict[str, Any] | None:
        obj = await get(kube, namespace, "late-v1")
        return obj if (obj.get("status") or {}).get("phase") == "Pending" else None

    obj = await eventually(pending, what="Pending")
    cond = condition(obj, "Ready")
    assert cond is not None
    assert cond["reason"] == "ArtifactNotFound"
    write_artifact(artifact_root, namespace, "late", 1)
    # The operator retries by itself (TemporaryError with a delay): no spec change needed.
    await eventually(lambda: ready(kube, namespace, "late-v1"), within=40, what="Ready")


async def test_digest_mismatch_fails_permanently(
    kube: KubeClient, namespace: str, operator: KopfRunner, artifact_root: Path
) -> None:
    uri = write_artifact(artifact_root, namespace, "m", 1)
    bad = version("m-v1", "m", 1, uri)
    bad["spec"]["artifact"]["sha256"] = "0" * 64
    await kube.create(MODEL_VERSIONS, namespace, bad)

    async def failed() -> dict[str, Any] | None:
        obj = await get(kube, namespace, "m-v1")
        return obj if (obj.get("status") or {}).get("phase") == "Failed" else None

    obj = await eventually(failed, what="Failed")
    cond = condition(obj, "Ready")
    assert cond is not None
    assert cond["reason"] == "ArtifactDigestMismatch"
    assert "spec.artifact.sha256" in cond["message"]


async def test_pvc_artifact_needs_the_claim_in_the_namespace(
    kube: KubeClient, namespace: str, operator: KopfRunner
) -> None:
    await kube.create(MODEL_VERSIONS, namespace, version("p-v1", "p", 1, "pvc://models/p/v1"))

    async def reason() -> str | None:
        cond = condition(await get(kube, namespace, "p-v1"), "Ready")
        return cond["reason"] if cond else None

    assert await eventually(reason) == "ArtifactNotFound"
    await kube.create(
        PVCS,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    obj = await eventually(lambda: ready(kube, namespace, "p-v1"), within=40, what="Ready")
    assert condition(obj, "Ready")["reason"] == "ArtifactUnverified"  # type: ignore[index]


async def registry_index(
    kube: KubeClient, namespace: str, model: str, *, aliases: dict[str, str]
) -> dict[str, Any] | None:
    """The model's index once it shows ``aliases`` (it is written shortly after changes)."""
    try:
        cm = await kube.get(CONFIGMAPS, namespace, f"kubeloop-registry-{model}")
    except NotFound:
        return None
    index: dict[str, Any] = json.loads(cm["data"]["index.json"])
    return index if index["aliases"] == aliases else None


async def alias_holders(
    kube: KubeClient, namespace: str, model: str, alias: str
) -> tuple[list[str], list[str]]:
    items = await kube.list(MODEL_VERSIONS, namespace)
    mine = [i for i in items if i["spec"]["modelName"] == model]
    spec = [i["metadata"]["name"] for i in mine if alias in i["spec"].get("aliases", [])]
    status = [
        i["metadata"]["name"] for i in mine if alias in (i.get("status") or {}).get("aliases", [])
    ]
    return spec, status


async def settled(kube: KubeClient, namespace: str) -> bool | list[Any]:
    items = await kube.list(MODEL_VERSIONS, namespace)
    done = all(
        (i.get("status") or {}).get("observedGeneration") == i["metadata"]["generation"]
        and (i.get("status") or {}).get("phase") == "Ready"
        for i in items
    )
    # On a timeout, `eventually` shows what is still unsettled.
    return done or (
        [
            (
                i["metadata"]["name"],
                i["metadata"]["generation"],
                i["spec"].get("aliases"),
                i.get("status", {}).get("observedGeneration"),
                i.get("status", {}).get("phase"),
            )
            for i in items
            if i.get("status", {}).get("observedGeneration") != i["metadata"]["generation"]
        ]
        and False
    )


async def test_alias_has_one_holder_under_concurrent_claims(
    kube: KubeClient, namespace: str, operator: KopfRunner, artifact_root: Path
) -> None:
    uri = write_artifact(artifact_root, namespace, "fraud", 1)
    names = [f"fraud-v{i}" for i in range(1, 9)]
    await asyncio.gather(
        *(
            kube.create(MODEL_VERSIONS, namespace, version(n, "fraud", i, uri))
            for i, n in enumerate(names, start=1)
        )
    )
    await eventually(lambda: settled(kube, namespace), what="all Ready")
    for round_ in range(3):
        # Every version claims production at once (as several pipelines finishing together).
        await asyncio.gather(
            *(
                kube.patch(MODEL_VERSIONS, namespace, n, {"spec": {"aliases": ["production"]}})
                for n in names
            )
        )
        await eventually(lambda: settled(kube, namespace), within=60, what="settled")
        spec, status = await alias_holders(kube, namespace, "fraud", "production")
        assert len(spec) == 1, f"round {round_}: spec holders {spec}"
        assert status == spec, f"round {round_}: status {status} vs spec {spec}"
    index = await eventually(
        lambda: registry_index(kube, namespace, "fraud", aliases={"production": spec[0]}),
        what="index with the final holder",
    )
    assert len(index["versions"]) == 8


async def test_operator_killed_mid_work_resumes_without_duplicates(
    kube: KubeClient, namespace: str, artifact_root: Path, tmp_path: Path
) -> None:
    log = tmp_path / "operator.log"
    models: list[str] = []

    async def ready_count(batch: list[dict[str, Any]]) -> int:
        names = {d["metadata"]["name"] for d in batch}
        items = await kube.list(MODEL_VERSIONS, namespace)
        return sum(
            i["metadata"]["name"] in names and (i.get("status") or {}).get("phase") == "Ready"
            for i in items
        )

    async def kill_on_first_ready(batch: list[dict[str, Any]]) -> int:
        """Start the operator, SIGKILL it on the first Ready of ``batch`` a watch shows, and
        return how many of the batch were Ready by then."""
        names = {d["metadata"]["name"] for d in batch}
        first: subprocess.Popen[bytes] | None = None
        try:
            # Polling would see the first Ready too late. The operator starts only once the
            # watch is open (its first event), so that Ready cannot slip by while it connects.
            async for _, obj in kube.watch(MODEL_VERSIONS, namespace, timeout_seconds=60):
                if first is None:
                    first = operator_process(namespace, artifact_root, log)
                ready = (obj.get("status") or {}).get("phase") == "Ready"
                if ready and obj["metadata"]["name"] in names:
                    break
            assert first is not None
            first.send_signal(signal.SIGKILL)  # no graceful shutdown: mid-work
            first.wait(10)
            return await ready_count(batch)
        finally:
            if first is not None and first.poll() is None:
                first.kill()

    # Enough work that the kill lands mid-way (the operator handles ~100 versions a second). On
    # a loaded machine the watch can fall so far behind that the operator has finished the whole
    # batch before the test sees its first Ready; then the kill proved nothing, and another batch
    # is tried: the test fails only if no kill of three lands mid-work.
    for attempt in range(3):
        batch_models = [f"model{attempt}x{i:02d}" for i in range(15)]
        uris = {m: write_artifact(artifact_root, namespace, m, 1) for m in batch_models}
        batch = [
            version(f"{m}-v{i}", m, i, uris[m], aliases=["latest"] if i == 10 else [])
            for m in batch_models
            for i in range(1, 11)
        ]
        await asyncio.gather(*(kube.create(MODEL_VERSIONS, namespace, d) for d in batch))
        models += batch_models
        if await kill_on_first_ready(batch) < len(batch):
            break
    else:
        raise AssertionError("three operators each finished their batch before being killed")
    second = operator_process(namespace, artifact_root, log)
    try:
        await eventually(lambda: settled(kube, namespace), within=90, what="all Ready")
    finally:
        second.terminate()
        second.wait(20)
    for m in models:
        wanted = {"latest": f"{m}-v10"}
        index = await eventually(
            functools.partial(registry_index, kube, namespace, m, aliases=wanted),
            what=f"index of {m}",
        )
        assert [v["version"] for v in index["versions"]] == list(range(1, 11))
        cm = await kube.get(CONFIGMAPS, namespace, f"kubeloop-registry-{m}")
        assert len(cm["metadata"]["ownerReferences"]) == 10
    configmaps = [
        c["metadata"]["name"]
        for c in await kube.list(
            CONFIGMAPS, namespace, label_selector="app.kubernetes.io/managed-by=kubeloop"
        )
    ]
    assert sorted(configmaps) == [f"kubeloop-registry-{m}" for m in models]
    items = await kube.list(MODEL_VERSIONS, namespace)
    assert len(items) == 10 * len(models)


async def test_deleting_a_version_drops_it_from_the_index(
    kube: KubeClient, namespace: str, operator: KopfRunner, artifact_root: Path
) -> None:
    uri = write_artifact(artifact_root, namespace, "d", 1)
    for i in (1, 2):
        await kube.create(MODEL_VERSIONS, namespace, version(f"d-v{i}", "d", i, uri))
    await eventually(lambda: settled(kube, namespace), what="Ready")
    await kube.delete(MODEL_VERSIONS, namespace, "d-v1")

    async def index_versions() -> list[int] | None:
        try:
            cm = await kube.get(CONFIGMAPS, namespace, "kubeloop-registry-d")
        except NotFound:
            return None
        found = [v["version"] for v in json.loads(cm["data"]["index.json"])["versions"]]
        return found if found == [2] else None

    assert await eventually(index_versions, what="index without d-v1") == [2]


async def test_a_misnamed_version_is_refused(
    kube: KubeClient, namespace: str, operator: KopfRunner, artifact_root: Path
) -> None:
    uri = write_artifact(artifact_root, namespace, "m", 1)
    doc = version("m-v1", "m", 1, uri)
    doc["metadata"]["name"] = "m-latest"
    await kube.create(MODEL_VERSIONS, namespace, doc)

    async def reason() -> str | None:
        cond = condition(await get(kube, namespace, "m-latest"), "Ready")
        return cond["reason"] if cond else None

    assert await eventually(reason) == "InvalidName"
    assert (await get(kube, namespace, "m-latest"))["status"]["phase"] == "Failed"
