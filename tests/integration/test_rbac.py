"""Least privilege proven against the chart really installed: SubjectAccessReviews, asked of
the API server as admin, for the operator's ServiceAccount and for tenants.

The chart is installed twice (a module fixture per mode): namespaced (watching tenant-a only)
and cluster-wide. The operator pod never runs (there is no kubelet); RBAC does not need it.
Cluster-wide, the webhook is left out: with failurePolicy Fail and no operator to answer, it
would refuse every kubeloop write in the cluster the other tests share.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import LocalCluster
from tests.integration.test_chart_ha_tenants import CHART, helm

RELEASE_NS = "kubeloop-system"
SA = f"system:serviceaccount:{RELEASE_NS}:kubeloop"
SA_GROUPS = [
    "system:serviceaccounts",
    f"system:serviceaccounts:{RELEASE_NS}",
    "system:authenticated",
]
WATCHED, UNWATCHED = "tenant-a", "tenant-b"
USER_GROUPS = ["system:authenticated"]


@dataclass(frozen=True)
class Installed:
    cluster: LocalCluster
    namespaced: bool


@pytest.fixture(scope="module", params=["namespaced", "cluster-wide"])
def installed(crds: LocalCluster, request: pytest.FixtureRequest) -> Iterator[Installed]:
    cluster = crds
    namespaced = request.param == "namespaced"
    for ns in (RELEASE_NS, WATCHED, UNWATCHED):
        cluster.kubectl("create", "namespace", ns, check=False)
    # Tenants: alice edits kubeloop resources in tenant-a, bob in tenant-b.
    for user, ns in (("alice", WATCHED), ("bob", UNWATCHED)):
        cluster.kubectl(
            "create",
            "rolebinding",
            f"{user}-kubeloop-edit",
            "--clusterrole=kubeloop-edit",
            f"--user={user}",
            "-n",
            ns,
            check=False,
        )
    mode = (
        ["--set", f"operator.watchNamespaces={{{WATCHED}}}"]
        if namespaced
        else ["--set", "webhook.enabled=false"]
    )
    # The same release test_chart.py installs, so either test may run first.
    out = helm(
        cluster,
        "upgrade",
        "--install",
        "kubeloop",
        str(CHART),
        "-n",
        RELEASE_NS,
        "--set",
        "crds.enabled=false",
        *mode,
        "--wait=false",
    )
    assert "STATUS: deployed" in out.stdout
    yield Installed(cluster, namespaced)
    helm(cluster, "uninstall", "kubeloop", "-n", RELEASE_NS)


def allowed(
    cluster: LocalCluster,
    user: str,
    verb: str,
    resource: str,
    namespace: str = "",
    *,
    group: str = "",
    subresource: str = "",
    groups: list[str] | None = None,
) -> bool:
    """The API server's answer to a SubjectAccessReview (namespace "": cluster-wide)."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": groups if groups is not None else (SA_GROUPS if user == SA else USER_GROUPS),
            "resourceAttributes": {
                "namespace": namespace,
                "verb": verb,
                "group": group,
                "resource": resource,
                "subresource": subresource,
            },
        },
    }
    out = cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review))
    status = json.loads(out.stdout)["status"]
    assert "evaluationError" not in status, status
    return bool(status["allowed"])


KL = "kubeloop.dev"
KOPF = "kopf.dev"
CRD = ("customresourcedefinitions", "apiextensions.k8s.io")


# --- the operator's ServiceAccount -----------------------------------------------------------


@pytest.mark.parametrize("verb", ["get", "list", "watch"])
@pytest.mark.parametrize("namespace", ["", WATCHED, UNWATCHED])
def test_the_operator_reads_no_secrets(installed: Installed, verb: str, namespace: str) -> None:
    assert allowed(installed.cluster, SA, verb, "secrets", namespace) is False


@pytest.mark.parametrize("verb", ["create", "update", "patch", "delete", "deletecollection"])
def test_the_operator_writes_no_crds(installed: Installed, verb: str) -> None:
    assert allowed(installed.cluster, SA, verb, CRD[0], group=CRD[1]) is False


@pytest.mark.parametrize("verb", ["list", "watch"])
def test_the_operator_may_discover_crds(installed: Installed, verb: str) -> None:
    """The positive control for the row above: kopf's CRD watch is granted."""
    assert allowed(installed.cluster, SA, verb, CRD[0], group=CRD[1]) is True


def test_the_operator_works_in_a_watched_namespace(installed: Installed) -> None:
    cluster = installed.cluster
    assert allowed(cluster, SA, "list", "trainingruns", WATCHED, group=KL) is True
    assert allowed(cluster, SA, "watch", "modelversions", WATCHED, group=KL) is True
    assert allowed(cluster, SA, "create", "trainingruns", WATCHED, group=KL) is True
    assert (
        allowed(cluster, SA, "patch", "modeldeployments", WATCHED, group=KL, subresource="status")
        is True
    )
    assert allowed(cluster, SA, "patch", "configmaps", WATCHED) is True  # server-side apply,
    assert allowed(cluster, SA, "create", "configmaps", WATCHED) is True  # which may create
    assert allowed(cluster, SA, "create", "events", WATCHED) is True


def test_the_operator_has_no_rights_it_does_not_use(installed: Installed) -> None:
    cluster = installed.cluster
    assert allowed(cluster, SA, "get", "configmaps", WATCHED) is False
    assert allowed(cluster, SA, "update", "configmaps", WATCHED) is False
    assert allowed(cluster, SA, "delete", "configmaps", WATCHED) is False
    assert allowed(cluster, SA, "update", "trainingruns", WATCHED, group=KL) is False
    assert allowed(cluster, SA, "delete", "modelversions", WATCHED, group=KL) is False
    assert allowed(cluster, SA, "create", "pods", WATCHED) is False
    assert allowed(cluster, SA, "create", "services", WATCHED) is False
    assert allowed(cluster, SA, "patch", "events", WATCHED) is False
    assert (
        allowed(
            cluster,
            SA,
            "create",
            "validatingwebhookconfigurations",
            group="admissionregistration.k8s.io",
        )
        is False
    )


def test_namespaced_the_operator_cannot_touch_an_unwatched_namespace(installed: Installed) -> None:
    cluster = installed.cluster
    if not installed.namespaced:
        # Cluster-wide the operator's rights span every namespace: that is the mode.
        assert allowed(cluster, SA, "list", "trainingruns", UNWATCHED, group=KL) is True
        assert allowed(cluster, SA, "list", "trainingruns", "", group=KL) is True
        assert allowed(cluster, SA, "list", "namespaces") is False  # kopf does not need it
        return
    assert allowed(cluster, SA, "list", "trainingruns", UNWATCHED, group=KL) is False
    assert allowed(cluster, SA, "patch", "configmaps", UNWATCHED) is False
    assert allowed(cluster, SA, "create", "configmaps", UNWATCHED) is False
    assert allowed(cluster, SA, "create", "events", UNWATCHED) is False
    assert allowed(cluster, SA, "list", "trainingruns", "", group=KL) is False  # cluster-wide
    assert allowed(cluster, SA, "list", "namespaces") is True  # names only, for kopf


def test_server_side_apply_creates_with_the_granted_verbs(installed: Installed) -> None:
    """The registry index is server-side applied: done for real, impersonating the
    ServiceAccount, it creates the ConfigMap in a watched namespace (the API server checks
    create as well as patch for an apply that creates) and is refused elsewhere."""
    cluster = installed.cluster
    manifest = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kubeloop-rbac-probe"},
            "data": {"probe": "1"},
        }
    )
    as_sa = [f"--as={SA}", *[f"--as-group={g}" for g in SA_GROUPS]]
    args = ["apply", "--server-side", "--field-manager=kubeloop", *as_sa, "-f", "-"]
    applied = cluster.kubectl(*args, "-n", WATCHED, input=manifest, check=False)
    assert applied.returncode == 0, applied.stderr
    cluster.kubectl("delete", "configmap", "-n", WATCHED, "kubeloop-rbac-probe")
    if installed.namespaced:
        refused = cluster.kubectl(*args, "-n", UNWATCHED, input=manifest, check=False)
        assert refused.returncode != 0
        assert "forbidden" in refused.stderr


# --- peering: how the replicas elect the active one -----------------------------------------


@pytest.mark.parametrize("verb", ["list", "watch", "patch"])
def test_the_operator_peers_through_its_peering_object(installed: Installed, verb: str) -> None:
    """kopf lists and watches the peering object and merge-patches its keep-alive into it:
    cluster-wide a ClusterKopfPeering, namespaced a KopfPeering in each watched namespace."""
    cluster = installed.cluster
    in_watched = allowed(cluster, SA, verb, "kopfpeerings", WATCHED, group=KOPF)
    in_unwatched = allowed(cluster, SA, verb, "kopfpeerings", UNWATCHED, group=KOPF)
    cluster_scoped = allowed(cluster, SA, verb, "clusterkopfpeerings", group=KOPF)
    if installed.namespaced:
        assert (in_watched, in_unwatched, cluster_scoped) == (True, False, False)
    else:
        assert (in_watched, in_unwatched, cluster_scoped) == (False, False, True)


@pytest.mark.parametrize("verb", ["get", "create", "update", "delete", "deletecollection"])
def test_the_operator_neither_makes_nor_removes_peering_objects(
    installed: Installed, verb: str
) -> None:
    """The chart creates the objects; kopf never reads one by name, creates or deletes one."""
    cluster = installed.cluster
    assert allowed(cluster, SA, verb, "kopfpeerings", WATCHED, group=KOPF) is False
    assert allowed(cluster, SA, verb, "clusterkopfpeerings", group=KOPF) is False


def test_the_operator_writes_no_peering_status_subresource(installed: Installed) -> None:
    """The CRDs have no status subresource: kopf patches the object, never <plural>/status."""
    cluster = installed.cluster
    namespaced = ("kopfpeerings", WATCHED) if installed.namespaced else ("clusterkopfpeerings", "")
    assert allowed(cluster, SA, "patch", *namespaced, group=KOPF, subresource="status") is False


# --- tenants ------------------------------------------------------------------------------


def test_a_tenant_creates_training_runs_in_its_namespace_only(installed: Installed) -> None:
    cluster = installed.cluster
    assert allowed(cluster, "alice", "create", "trainingruns", WATCHED, group=KL) is True
    assert allowed(cluster, "alice", "create", "trainingruns", UNWATCHED, group=KL) is False
    assert allowed(cluster, "bob", "create", "trainingruns", UNWATCHED, group=KL) is True


def test_a_tenant_cannot_patch_another_tenants_model_version(installed: Installed) -> None:
    cluster = installed.cluster
    assert allowed(cluster, "alice", "patch", "modelversions", WATCHED, group=KL) is True
    assert allowed(cluster, "alice", "patch", "modelversions", UNWATCHED, group=KL) is False
    assert allowed(cluster, "alice", "get", "modelversions", UNWATCHED, group=KL) is False
    # Nor write status, which only the operator writes.
    assert (
        allowed(cluster, "alice", "patch", "modelversions", WATCHED, group=KL, subresource="status")
        is False
    )
