"""The chart's life in a real API server, driven from Python (hack/helm.py, pyhelm3): install,
upgrade with changed values, rollback, uninstall.

The tests run in order on one release. The first revision comes from an older copy of the chart
(version 0.0.9, whose TrainingRun CRD lacks the Reason printer column and describes itself
differently); the upgrade to the real chart must update the CRD in the API server and roll the
operator's Deployment (the controller-manager makes a new ReplicaSet and scales the old one to
0; kwok runs the pods on its fake node). The rollback brings revision 1 back; the uninstall
leaves the CRDs (helm.sh/resource-policy: keep) and a tenant's resources where they were.

The CRDs are cluster-wide and shared by the whole session: the first install adopts the ones
the ``crds`` fixture applied with kubectl (``take_ownership``), and the module puts them back as
it found them.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hack.chart_crds import render_template
from hack.helm import CHART, Helm

from tests.conftest import ROOT
from tests.integration.conftest import LocalCluster
from tests.integration.polling import eventually

RELEASE = "kl-lifecycle"
FULLNAME = f"{RELEASE}-kubeloop"  # the chart's fullname for a release without "kubeloop"
TR_CRD = "trainingruns.kubeloop.dev"
TR_FILE = "kubeloop.dev_trainingruns.yaml"  # in crds/ and in the chart's templates/crds/
KUBELOOP_CRDS = sorted(
    yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").glob("*.yaml")
)
OLD_VERSION = "0.0.9"
OLD_DESCRIPTION = "A TrainingRun, as kubeloop 0.0.9 described it."
# The fake node keeps the not-ready taint (this control plane runs no node-lifecycle
# controller to lift it); without the toleration the pods would stay Pending.
TOLERATE_FAKE_NODE = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"}
]
# The admission webhook stays off: the API server cannot reach an in-cluster Service here, and a
# Fail policy would refuse the tenant's resources (test_chart.py and test_admission.py cover it).
FIRST: dict[str, Any] = {
    "replicas": 1,
    "webhook": {"enabled": False},
    "tolerations": TOLERATE_FAKE_NODE,
    "operator": {"logLevel": "info", "executor": "kfp"},
}
SECOND: dict[str, Any] = {**FIRST, "operator": {"logLevel": "debug", "executor": "local"}}


@dataclass
class Lifecycle:
    cluster: LocalCluster
    helm: Helm
    namespace: str  # the release's
    tenant: str  # a team's namespace
    old_chart: Path
    crds_before: set[str]  # the CRDs the cluster had before the install
    stages: list[str] = field(default_factory=list)  # the stages that passed, in order
    active: dict[str, str] = field(default_factory=dict)  # revision -> pod-template-hash

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.cluster.kubectl(*args, "-o", "json").stdout)

    def require(self, stage: str) -> None:
        if stage not in self.stages:
            pytest.skip(f"needs the {stage} stage, which did not pass")


def old_chart(into: Path) -> Path:
    """A copy of the chart as an older release had it: version 0.0.9, and a TrainingRun CRD
    without the Reason column and with another description."""
    chart = into / "kubeloop"
    shutil.copytree(CHART, chart)
    meta = chart / "Chart.yaml"
    lines = [
        f"version: {OLD_VERSION}" if ln.startswith("version:") else ln
        for ln in meta.read_text().splitlines()
    ]
    meta.write_text("\n".join(lines) + "\n")
    crd = yaml.safe_load((ROOT / "crds" / TR_FILE).read_text())
    version = crd["spec"]["versions"][0]
    version["additionalPrinterColumns"] = [
        c for c in version["additionalPrinterColumns"] if c["name"] != "Reason"
    ]
    version["schema"]["openAPIV3Schema"]["description"] = OLD_DESCRIPTION
    (chart / "templates" / "crds" / TR_FILE).write_text(render_template(crd))
    return chart


def served_crd(life: Lifecycle) -> tuple[list[str], str]:
    """The TrainingRun CRD as the API server serves it: printer columns and description."""
    version = life.kubectl_json("get", "crd", TR_CRD)["spec"]["versions"][0]
    columns = [c["name"] for c in version.get("additionalPrinterColumns", [])]
    return columns, version["schema"]["openAPIV3Schema"]["description"]


async def rolled_out(life: Lifecycle) -> dict[str, Any]:
    """Once the controller-manager has rolled the operator's Deployment out: its pod template,
    the pod-template-hash of the one ReplicaSet that runs pods, and every ReplicaSet's size."""

    async def probe() -> dict[str, Any]:
        deploy = life.kubectl_json("get", "deployment", "-n", life.namespace, FULLNAME)
        sets = life.kubectl_json("get", "replicasets", "-n", life.namespace)["items"]
        pods = life.kubectl_json("get", "pods", "-n", life.namespace)["items"]
        status, want = deploy.get("status", {}), deploy["spec"]["replicas"]
        sizes = {
            rs["metadata"]["labels"]["pod-template-hash"]: (
                rs["spec"]["replicas"],
                rs.get("status", {}).get("replicas", 0),
            )
            for rs in sets
        }
        running = {
            p["metadata"]["labels"]["pod-template-hash"]
            for p in pods
            if p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]
        }
        return {
            "done": status.get("observedGeneration") == deploy["metadata"]["generation"]
            and status.get("updatedReplicas") == want
            and status.get("availableReplicas") == want
            and status.get("replicas") == want  # no old pod left
            and len(running) == 1
            and len(pods) == want
            and all(p["spec"].get("nodeName") for p in pods),  # the scheduler bound them
            "active": next(iter(running), None),
            "sizes": sizes,
            "template": deploy["spec"]["template"]["spec"]["containers"][0],
        }

    return await eventually(probe, lambda s: bool(s["done"]), within=60)


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


@pytest.fixture(scope="module")
async def life(
    crds: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Lifecycle]:
    suffix = uuid.uuid4().hex[:6]
    state = Lifecycle(
        cluster=crds,
        helm=Helm(crds.kubeconfig, crds.bin_dir),
        namespace=f"kl-helm-{suffix}",
        tenant=f"team-{suffix}",
        old_chart=old_chart(tmp_path_factory.mktemp("chart")),
        crds_before=crd_names(crds),
    )
    try:
        yield state
    finally:
        await state.helm.uninstall(RELEASE, state.namespace)
        for ns in (state.namespace, state.tenant):
            crds.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false")
        restore_crds(crds, state.crds_before)


def crd_names(cluster: LocalCluster) -> set[str]:
    return set(cluster.kubectl("get", "crd", "-o", "name").stdout.replace("/", " ").split()[1::2])


def restore_crds(cluster: LocalCluster, before: set[str]) -> None:
    """The CRDs as the module found them: the ones the release added (kopf's peering CRDs)
    deleted with what the release kept in them, the kubeloop ones as the crds fixture applies
    them, owned by no release again."""
    crds = json.loads(cluster.kubectl("get", "crd", "-o", "json").stdout)["items"]
    owned = [
        c["metadata"]["name"]
        for c in crds
        if c["metadata"].get("annotations", {}).get("meta.helm.sh/release-name") == RELEASE
    ]
    added = [name for name in owned if name not in before]
    if added:
        cluster.kubectl("delete", "crd", *added)
    for crd in crds:  # objects the release kept (its peering object) in CRDs that stay
        name, spec = crd["metadata"]["name"], crd["spec"]
        if name in before and spec["group"] == "kopf.dev":
            selector = f"app.kubernetes.io/instance={RELEASE}"
            cluster.kubectl("delete", spec["names"]["plural"], "-A", "-l", selector)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    owned = [name for name in owned if name not in added]
    if owned:
        cluster.kubectl(
            "annotate",
            "crd",
            *owned,
            "meta.helm.sh/release-name-",
            "meta.helm.sh/release-namespace-",
            "helm.sh/resource-policy-",
        )
        cluster.kubectl("label", "crd", *owned, "app.kubernetes.io/managed-by-")
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", *KUBELOOP_CRDS)


# What a team creates in its namespace while the release lives.
TENANT_RESOURCES: list[dict[str, Any]] = [
    {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": "churn-v1"},
        "spec": {"modelName": "churn", "version": 1, "artifact": {"uri": "s3://bucket/churn/1"}},
    },
    {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "churn"},
        "spec": {
            "data": {"uri": "builtin://breast-cancer", "target": "target"},
            "registration": {"modelName": "churn"},
        },
    },
]
EXPECTED_TENANT_OBJECTS = {("ModelVersion", "churn-v1"), ("TrainingRun", "churn")}


def tenant_objects(life: Lifecycle) -> set[tuple[str, str]]:
    items = life.kubectl_json("get", "modelversions,trainingruns", "-n", life.tenant)["items"]
    return {(i["kind"], i["metadata"]["name"]) for i in items}


async def test_install(life: Lifecycle) -> None:
    """The old chart installs over the CRDs kubectl applied (adopted), and the operator's pod
    runs on the fake node."""
    assert "Reason" in served_crd(life)[0]  # the crds fixture's, from the models
    rev = await life.helm.install_or_upgrade(
        RELEASE, life.namespace, FIRST, chart=life.old_chart, take_ownership=True
    )
    assert (rev.number, rev.status, rev.description) == (1, "deployed", "Install complete")
    assert rev.resource("Deployment")["spec"]["replicas"] == 1
    columns, description = served_crd(life)
    assert "Reason" not in columns
    assert description == OLD_DESCRIPTION
    crd = life.kubectl_json("get", "crd", TR_CRD)["metadata"]
    assert crd["annotations"]["meta.helm.sh/release-name"] == RELEASE  # adopted
    assert crd["annotations"]["helm.sh/resource-policy"] == "keep"
    first = await rolled_out(life)
    assert "--verbose" not in first["template"]["args"]
    assert env(first["template"])["KUBELOOP_EXECUTOR"] == "kfp"
    life.active["1"] = first["active"]
    assert await life.helm.values(RELEASE, life.namespace) == FIRST
    life.stages.append("install")


async def test_upgrade_updates_the_crds_and_rolls_the_operator(life: Lifecycle) -> None:
    life.require("install")
    rev = await life.helm.install_or_upgrade(RELEASE, life.namespace, SECOND)
    assert (rev.number, rev.status, rev.description) == (2, "deployed", "Upgrade complete")
    # The API server serves the real chart's CRD now: the column is back, the description new.
    generated = yaml.safe_load((ROOT / "crds" / TR_FILE).read_text())
    version = generated["spec"]["versions"][0]
    assert served_crd(life) == (
        [c["name"] for c in version["additionalPrinterColumns"]],
        version["schema"]["openAPIV3Schema"]["description"],
    )
    # The changed values changed the pod template, so the controller-manager rolled it: a new
    # ReplicaSet runs the pod, the first one is scaled to 0 and its pod is gone.
    second = await rolled_out(life)
    assert "--verbose" in second["template"]["args"]
    assert env(second["template"])["KUBELOOP_EXECUTOR"] == "local"
    assert second["active"] != life.active["1"]
    assert second["sizes"][life.active["1"]] == (0, 0)
    assert second["sizes"][second["active"]] == (1, 1)
    life.active["2"] = second["active"]

    # Meanwhile a team works in its own namespace.
    life.cluster.kubectl("create", "namespace", life.tenant)
    for doc in TENANT_RESOURCES:
        life.cluster.kubectl("apply", "-n", life.tenant, "-f", "-", input=json.dumps(doc))
    life.stages.append("upgrade")


async def test_rollback_to_the_first_revision(life: Lifecycle) -> None:
    life.require("upgrade")
    rev = await life.helm.rollback(RELEASE, life.namespace, 1)
    assert (rev.number, rev.status, rev.description) == (3, "deployed", "Rollback to 1")
    assert await life.helm.values(RELEASE, life.namespace) == FIRST
    history = [
        (h.number, h.status, h.chart, h.description)
        for h in await life.helm.history(RELEASE, life.namespace)
    ]
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert history == [
        (1, "superseded", f"kubeloop-{OLD_VERSION}", "Install complete"),
        (2, "superseded", f"kubeloop-{chart_version}", "Upgrade complete"),
        (3, "deployed", f"kubeloop-{OLD_VERSION}", "Rollback to 1"),
    ]
    # The pod template is revision 1's again: the Deployment scales the first ReplicaSet back
    # up rather than making a third.
    third = await rolled_out(life)
    assert "--verbose" not in third["template"]["args"]
    assert env(third["template"])["KUBELOOP_EXECUTOR"] == "kfp"
    assert third["active"] == life.active["1"]
    assert third["sizes"][life.active["2"]] == (0, 0)
    assert len(third["sizes"]) == 2
    # CRDs are templates, so a rollback rolls them back too (still serving the tenant's objects).
    columns, description = served_crd(life)
    assert "Reason" not in columns
    assert description == OLD_DESCRIPTION
    assert tenant_objects(life) == EXPECTED_TENANT_OBJECTS
    life.stages.append("rollback")


async def test_uninstall_keeps_the_crds_and_the_tenants_resources(life: Lifecycle) -> None:
    life.require("rollback")
    await life.helm.uninstall(RELEASE, life.namespace)
    assert await life.helm.current(RELEASE, life.namespace) is None
    gone = life.cluster.kubectl("get", "deployment", "-n", life.namespace, FULLNAME, check=False)
    assert "NotFound" in gone.stderr
    gone = life.cluster.kubectl("get", "clusterrole", f"{FULLNAME}-operator", check=False)
    assert "NotFound" in gone.stderr
    kept = {c["metadata"]["name"] for c in life.kubectl_json("get", "crd")["items"]}
    assert set(KUBELOOP_CRDS) <= kept
    assert tenant_objects(life) == EXPECTED_TENANT_OBJECTS
    life.stages.append("uninstall")
