"""The chart's high availability, tenant onboarding and Grafana dashboard: what it renders, and
what a real API server makes of it.

Rendering (``helm template``) checks the shapes. The installs check what only a server can
tell: that a *first* install creates kopf's peering CRDs and the peering objects in both modes
(Helm cannot map a custom resource whose CRD the same release creates, so the objects are
post-install hooks then and release resources once the kind is served), that kopf's own peering
code, run as the operator's ServiceAccount with nothing but the chart's RBAC, keeps its
keep-alive in them, that an upgrade keeps those keep-alives, and that tenants' namespaces and
what is in them outlive an uninstall. The operator pods never run (kwok has no kubelet).

Every install here is the release ``kubeloop`` in ``kubeloop-system`` (the same one
test_chart.py and test_rbac.py install; the aggregated ClusterRoles have fixed names, so only
one release can exist at a time): each test uninstalls it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.conftest import ROOT
from tests.integration.conftest import LocalCluster

CHART = ROOT / "charts" / "kubeloop"
RELEASE, RELEASE_NS = "kubeloop", "kubeloop-system"
SA_NAME = "kubeloop"
PEERING_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
SELECTOR = {"app.kubernetes.io/name": "kubeloop", "app.kubernetes.io/instance": RELEASE}
# Private Helm homes: no repositories, plugins or registry logins of anyone else's.
HELM_HOME = Path(tempfile.gettempdir()) / f"kubeloop-helm-{os.getuid()}-{os.getpid()}"

T = TypeVar("T")


def helm(cluster: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(cluster.bin_dir / "helm"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "HELM_CACHE_HOME": str(HELM_HOME / "cache"),
            "HELM_CONFIG_HOME": str(HELM_HOME / "config"),
            "HELM_DATA_HOME": str(HELM_HOME / "data"),
        },
    )
    if check and result.returncode:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stderr}")
    return result


def template(
    cluster: LocalCluster, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return helm(
        cluster,
        "template",
        RELEASE,
        str(CHART),
        "--kube-version",
        "1.35.4",
        "-n",
        RELEASE_NS,
        *args,
        check=check,
    )


def render(cluster: LocalCluster, *args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(cluster, *args).stdout) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = of_kind(docs, "Deployment")
    return found


def env_of(docs: list[dict[str, Any]]) -> dict[str, str | None]:
    container = deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def wait_for(check: Callable[[], T], timeout: float = 30, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.3)


def kubectl_json(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cluster.kubectl("get", "-o", "json", *args).stdout)
    return out


def can(cluster: LocalCluster, who: str, verb: str, resource: str, *extra: str) -> bool:
    result = cluster.kubectl("auth", "can-i", verb, resource, f"--as={who}", *extra, check=False)
    return result.stdout.strip() == "yes"


@pytest.fixture(autouse=True)
def _helm_home() -> None:
    HELM_HOME.mkdir(exist_ok=True)


# --- high availability: rendering ----------------------------------------------------------


def test_two_replicas_roll_one_at_a_time_with_peering_on(cluster: LocalCluster) -> None:
    docs = render(cluster)
    spec = deployment(docs)["spec"]
    assert spec["replicas"] == 2
    # A new pod starts as a standby beside the old ones; none goes before its successor is up.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    env = env_of(docs)
    assert (
        env["KUBELOOP_STANDALONE"],
        env["KUBELOOP_PEERING_NAME"],
        env["KUBELOOP_PEERING_LIFETIME"],
    ) == ("false", "kubeloop", "15")
    pod_id = next(
        e
        for e in deployment(docs)["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "POD_ID"
    )
    assert pod_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    custom = render(cluster, "--set", "peering.name=ml-ops", "--set", "peering.lifetime=30")
    env = env_of(custom)
    assert (env["KUBELOOP_PEERING_NAME"], env["KUBELOOP_PEERING_LIFETIME"]) == ("ml-ops", "30")
    assert [p["metadata"]["name"] for p in of_kind(custom, "ClusterKopfPeering")] == ["ml-ops"]
    assert deployment(render(cluster, "--set", "replicas=0"))["spec"]["replicas"] == 0


def test_a_disruption_budget_only_with_more_than_one_replica(cluster: LocalCluster) -> None:
    docs = render(cluster)
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": SELECTOR}}
    pod_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert SELECTOR.items() <= pod_labels.items()
    assert of_kind(render(cluster, "--set", "replicas=3"), "PodDisruptionBudget")
    for off in ("replicas=1", "replicas=0", "podDisruptionBudget.enabled=false"):
        assert not of_kind(render(cluster, "--set", off), "PodDisruptionBudget"), off


def test_replicas_spread_over_nodes_unless_the_user_says_otherwise(cluster: LocalCluster) -> None:
    affinity = deployment(render(cluster))["spec"]["template"]["spec"]["affinity"]
    assert affinity == {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": SELECTOR},
                    },
                }
            ]
        }
    }
    user = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}
                ]
            }
        }
    }
    docs = render(cluster, "--set-json", f"affinity={json.dumps(user)}")
    assert deployment(docs)["spec"]["template"]["spec"]["affinity"] == user


def test_every_replica_serves_the_webhook(cluster: LocalCluster) -> None:
    """The webhook Service selects the pods by the selector labels alone: any ready replica,
    standby or active, answers admission."""
    docs = render(cluster)
    (service,) = [
        s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "kubeloop-webhook"
    ]
    assert service["spec"]["selector"] == SELECTOR
    ports = deployment(docs)["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "webhook", "containerPort": 9443} in ports


def test_peering_objects_follow_the_mode(cluster: LocalCluster) -> None:
    # Cluster-wide: one ClusterKopfPeering; a hook while the kind is not served yet.
    (peering,) = of_kind(render(cluster), "ClusterKopfPeering")
    annotations = peering["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "hook-failed"
    assert annotations["helm.sh/resource-policy"] == "keep"
    assert annotations["meta.helm.sh/release-name"] == RELEASE
    # Served (an upgrade): an ordinary release resource, still kept.
    served = render(cluster, "--api-versions", "kopf.dev/v1/ClusterKopfPeering")
    (peering,) = of_kind(served, "ClusterKopfPeering")
    assert peering["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    # Namespaced: a KopfPeering in each watched namespace, tenants' included.
    docs = render(
        cluster,
        "--set",
        "operator.watchNamespaces={team-x}",
        "--set",
        "tenants[0].name=team-a",
    )
    assert not of_kind(docs, "ClusterKopfPeering")
    assert {p["metadata"]["namespace"] for p in of_kind(docs, "KopfPeering")} == {
        "team-x",
        "team-a",
    }
    # The chart installs both CRDs, kept like its own.
    crds = {c["metadata"]["name"]: c for c in of_kind(docs, "CustomResourceDefinition")}
    assert set(PEERING_CRDS) <= set(crds)
    assert all(
        crds[n]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        for n in PEERING_CRDS
    )
    # Without the chart's CRDs and none in the cluster: no object (it could not be created).
    off = render(cluster, "--set", "crds.enabled=false")
    assert not of_kind(off, "ClusterKopfPeering")
    assert not of_kind(off, "CustomResourceDefinition")
    on = render(
        cluster, "--set", "crds.enabled=false", "--api-versions", "kopf.dev/v1/ClusterKopfPeering"
    )
    assert of_kind(on, "ClusterKopfPeering")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replicsa=2", "additional properties 'replicsa' not allowed"),
        ("replicas=-1", "/replicas"),
        ("peering.lifetme=15", "additional properties 'lifetme' not allowed"),
        ("peering.lifetime=4", "/peering/lifetime"),
        ("peering.lifetime=301", "/peering/lifetime"),
        ("podDisruptionBudget.minAvaliable=1", "additional properties 'minAvaliable' not allowed"),
        ("dashboard.enable=true", "additional properties 'enable' not allowed"),
        ("dashboard.label.x=y", "additional properties 'label' not allowed"),
        ("tenants[0].nmae=team-a", "missing property 'name'"),
        ("tenants[0].name=Team_A", "/tenants/0/name"),
        ("tenants[0].name=a,tenants[0].quota.gpu=1", "additional properties 'gpu' not allowed"),
        ("tenants[0].name=a,tenants[0].kueue.localQueue=q", "missing property 'clusterQueue'"),
        ("tenants[0].name=a,tenants[0].editors[0].kind=Team", "/tenants/0/editors/0/kind"),
        ("tenants[0].name=a,tenants[0].dataPrefixes[0]=s3://no-slash", "/tenants/0/dataPrefixes/0"),
    ],
)
def test_the_schema_refuses_typos_in_the_new_values(
    cluster: LocalCluster, value: str, message: str
) -> None:
    out = template(cluster, "--set", value, check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


# --- tenants and the dashboard: rendering ---------------------------------------------------


def test_tenants_are_watched_and_their_prefixes_allowed(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    values = {
        "operator": {
            "watchNamespaces": ["team-x", "team-a"],
            "dataAllowlist": {"team-a": ["s3://shared/"], "*": ["gs://open/"]},
        },
        "tenants": [
            {"name": "team-a", "dataPrefixes": ["s3://lake/team-a/", "s3://shared/"]},
            {"name": "team-b", "createNamespace": False},
        ],
    }
    docs = render(cluster, "-f", values_file(tmp_path, values))
    env = env_of(docs)
    # In order, without repeats: what the operator, the Roles and the webhook all use.
    assert json.loads(env["KUBELOOP_NAMESPACES"] or "") == ["team-x", "team-a", "team-b"]
    assert json.loads(env["KUBELOOP_DATA_ALLOWLIST"] or "") == {
        "*": ["gs://open/"],
        "team-a": ["s3://shared/", "s3://lake/team-a/"],
    }
    assert {r["metadata"]["namespace"] for r in of_kind(docs, "Role")} == {
        "team-x",
        "team-a",
        "team-b",
    }
    (config,) = of_kind(docs, "ValidatingWebhookConfiguration")
    for hook in config["webhooks"]:
        assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == [
            "team-x",
            "team-a",
            "team-b",
        ]
    # Only the namespaces the chart is asked to create.
    assert [n["metadata"]["name"] for n in of_kind(docs, "Namespace")] == ["team-a"]

    # Cluster-wide every namespace is watched already; the prefixes still reach the operator.
    values["operator"] = {}
    docs = render(cluster, "-f", values_file(tmp_path, values))
    env = env_of(docs)
    assert json.loads(env["KUBELOOP_NAMESPACES"] or "") == []
    assert json.loads(env["KUBELOOP_DATA_ALLOWLIST"] or "") == {
        "team-a": ["s3://lake/team-a/", "s3://shared/"]
    }
    assert not of_kind(docs, "Role")
    assert "KUBELOOP_DATA_ALLOWLIST" not in env_of(render(cluster))


def test_a_local_queue_needs_kueue(cluster: LocalCluster) -> None:
    asked = (
        "--set",
        "tenants[0].name=team-a",
        "--set",
        "tenants[0].kueue.localQueue=team-a",
        "--set",
        "tenants[0].kueue.clusterQueue=gpu-pool",
    )
    refused = template(cluster, *asked, check=False)
    assert refused.returncode != 0
    assert "tenants[team-a].kueue: the cluster serves no Kueue LocalQueue API" in refused.stderr
    assert "--api-versions kueue.x-k8s.io/v1beta2/LocalQueue" in refused.stderr
    for served, expected in [
        (["kueue.x-k8s.io/v1beta1/LocalQueue"], "kueue.x-k8s.io/v1beta1"),
        (
            ["kueue.x-k8s.io/v1beta1/LocalQueue", "kueue.x-k8s.io/v1beta2/LocalQueue"],
            "kueue.x-k8s.io/v1beta2",
        ),
    ]:
        flags = [a for v in served for a in ("--api-versions", v)]
        (queue,) = of_kind(render(cluster, *asked, *flags), "LocalQueue")
        assert queue["apiVersion"] == expected
        assert queue["metadata"] == {**queue["metadata"], "name": "team-a", "namespace": "team-a"}
        assert queue["spec"] == {"clusterQueue": "gpu-pool"}
    # Not asked for: no LocalQueue, no Kueue needed.
    assert not of_kind(render(cluster, "--set", "tenants[0].name=team-a"), "LocalQueue")


def test_the_dashboard_config_map_only_when_enabled(cluster: LocalCluster) -> None:
    assert not [
        c for c in of_kind(render(cluster), "ConfigMap") if "dashboard" in c["metadata"]["name"]
    ]
    docs = render(
        cluster,
        "--set",
        "dashboard.enabled=true",
        "--set",
        "dashboard.namespace=monitoring",
        "--set",
        "dashboard.annotations.grafana_folder=kubeloop",
    )
    (dashboard,) = [
        c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "kubeloop-dashboard"
    ]
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "kubeloop"}
    (text,) = dashboard["data"].values()
    expected = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert json.loads(text) == expected
    (default_ns,) = [
        c
        for c in of_kind(render(cluster, "--set", "dashboard.enabled=true"), "ConfigMap")
        if c["metadata"]["name"] == "kubeloop-dashboard"
    ]
    assert default_ns["metadata"]["namespace"] == RELEASE_NS


# --- installs into the real API server -------------------------------------------------------


def _forget_kopf_crds(cluster: LocalCluster) -> None:
    """A cluster that has never seen kopf.dev (deleting a CRD deletes its objects too)."""
    cluster.kubectl("delete", "crd", *PEERING_CRDS, "--ignore-not-found", "--wait=true")


def _install(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    cluster.kubectl("create", "namespace", RELEASE_NS, check=False)
    # --take-ownership: the kubeloop CRDs may already be there, applied by the `crds` fixture.
    out = helm(
        cluster,
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "-n",
        RELEASE_NS,
        "--take-ownership",
        "--set",
        "webhook.enabled=false",  # no operator runs to answer it
        *args,
    )
    assert "STATUS: deployed" in out.stdout, out.stdout
    return out


def _uninstall(cluster: LocalCluster) -> subprocess.CompletedProcess[str]:
    return helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NS, "--wait", check=False)


@pytest.fixture
def release(cluster: LocalCluster) -> Iterator[None]:
    yield
    _uninstall(cluster)


def _sa_kubeconfig(cluster: LocalCluster, path: Path) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (a bound token)."""
    token = cluster.kubectl(
        "create", "token", SA_NAME, "-n", RELEASE_NS, "--duration=10m"
    ).stdout.strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = "operator"
    path.write_text(yaml.safe_dump(config))
    return path


def _peerings(cluster: LocalCluster, namespaces: list[str]) -> list[dict[str, Any]]:
    if not namespaces:
        return [kubectl_json(cluster, "clusterkopfpeering", "kubeloop")]
    return [kubectl_json(cluster, "kopfpeering", "kubeloop", "-n", ns) for ns in namespaces]


def _check_live_ha_objects(cluster: LocalCluster) -> None:
    """The Deployment and its budget as the API server took them."""
    live = kubectl_json(cluster, "deployment", "kubeloop", "-n", RELEASE_NS)
    assert live["spec"]["replicas"] == 2
    assert live["spec"]["strategy"]["type"] == "RollingUpdate"
    pdb = kubectl_json(cluster, "pdb", "kubeloop", "-n", RELEASE_NS)
    assert pdb["spec"]["minAvailable"] == 1

    # The disruption controller counts the pods the selector matches: the Deployment's two.
    def expected_pods() -> bool:
        status = kubectl_json(cluster, "pdb", "kubeloop", "-n", RELEASE_NS).get("status", {})
        return bool(status.get("expectedPods") == 2)

    wait_for(expected_pods, what="the PDB to count two pods")


def _kopf_peers_as_the_operator(cluster: LocalCluster, tmp_path: Path, watched: list[str]) -> None:
    """kopf's own peering code (no handlers), with the operator's credentials and the chart's
    RBAC only: its keep-alive lands in every peering object, and leaves with it."""
    handlers = tmp_path / "no_handlers.py"
    handlers.write_text("# peering only\n")
    scope = [a for ns in watched for a in ("--namespace", ns)] or ["--all-namespaces"]
    command = [sys.executable, "-m", "kopf", "run", "--verbose", "--peering", "kubeloop"]
    command += ["--priority", "100", *scope, str(handlers)]
    kubeconfig = _sa_kubeconfig(cluster, tmp_path / "sa.kubeconfig")
    log = tmp_path / "kopf.log"

    def keepalives() -> list[bool]:
        return ["replica-a" in (p.get("status") or {}) for p in _peerings(cluster, watched)]

    with log.open("w") as sink:
        kopf = subprocess.Popen(
            command,
            env={**os.environ, "KUBECONFIG": str(kubeconfig), "POD_ID": "replica-a"},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: all(keepalives()), what="kopf's keep-alive in every peering object")
        finally:
            kopf.send_signal(signal.SIGINT)
            kopf.wait(timeout=30)
    text = log.read_text()
    assert "Forbidden" not in text, text[-3000:]
    assert " 403" not in text, text[-3000:]
    # On its way out it removed its keep-alive (so a standby takes over at once).
    assert not any(keepalives()), text[-3000:]


MODES = {
    "cluster-wide": [],
    "namespaced": ["kl-peer-a", "kl-peer-b"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_first_install_makes_peering_that_kopf_can_use(
    cluster: LocalCluster, release: None, tmp_path: Path, mode: str
) -> None:
    """The kopf.dev CRDs and the operator in one release, on a cluster without them: the
    objects exist after the install; kopf's real peering, as the operator's ServiceAccount,
    writes and removes its keep-alive; an upgrade adopts the objects without touching it."""
    watched = MODES[mode]
    _forget_kopf_crds(cluster)
    for ns in watched:
        cluster.kubectl("create", "namespace", ns, check=False)
    args = ["--set", f"operator.watchNamespaces={{{','.join(watched)}}}"] if watched else []
    started = time.monotonic()
    _install(cluster, *args)
    install_s = time.monotonic() - started

    for name in PEERING_CRDS:
        crd = kubectl_json(cluster, "crd", name)
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    objects = _peerings(cluster, watched)  # they exist: `kubectl get` raised otherwise
    assert len(objects) == max(1, len(watched))
    if watched:
        listed = cluster.kubectl("get", "clusterkopfpeerings", "-o", "name").stdout
        assert not listed.strip(), "namespaced mode made a ClusterKopfPeering"

    _check_live_ha_objects(cluster)
    _kopf_peers_as_the_operator(cluster, tmp_path, watched)

    # An upgrade renders them as release resources: adopted, not re-created, status untouched.
    alive = {"priority": 7, "lifetime": 15, "lastseen": "2030-01-01T00:00:00+00:00"}
    patch = json.dumps({"status": {"replica-b": alive}})
    for obj in _peerings(cluster, watched):
        where = ["-n", obj["metadata"]["namespace"]] if watched else []
        cluster.kubectl(
            "patch", obj["kind"].lower(), "kubeloop", *where, "--type=merge", "-p", patch
        )
    uids = [p["metadata"]["uid"] for p in _peerings(cluster, watched)]
    _install(cluster, *args)
    after = _peerings(cluster, watched)
    assert [p["metadata"]["uid"] for p in after] == uids
    assert all(p["status"] == {"replica-b": alive} for p in after)
    manifest = helm(cluster, "get", "manifest", RELEASE, "-n", RELEASE_NS).stdout
    kind = "KopfPeering" if watched else "ClusterKopfPeering"
    assert sum(1 for d in yaml.safe_load_all(manifest) if d and d["kind"] == kind) == len(after)

    # Uninstalling keeps the CRDs and so the objects (like the kubeloop CRDs).
    out = _uninstall(cluster)
    assert out.returncode == 0, out.stderr
    assert len(_peerings(cluster, watched)) == len(after)
    for ns in watched:
        cluster.kubectl("delete", "namespace", ns, "--wait=false")
    print(f"\n{mode}: first install {install_s:.1f}s")


KUEUE_CRD = {
    # A stand-in for Kueue's LocalQueue CRD: the group, kind and versions the chart looks for.
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "localqueues.kueue.x-k8s.io"},
    "spec": {
        "group": "kueue.x-k8s.io",
        "scope": "Namespaced",
        "names": {
            "kind": "LocalQueue",
            "plural": "localqueues",
            "singular": "localqueue",
            "listKind": "LocalQueueList",
        },
        "versions": [
            {
                "name": "v1beta2",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["clusterQueue"],
                                "properties": {"clusterQueue": {"type": "string"}},
                            }
                        },
                    }
                },
            }
        ],
    },
}

TENANT_A, TENANT_B, WATCHED = "kl-tenant-a", "kl-tenant-b", "kl-watched"


@pytest.fixture
def kueue_crd(cluster: LocalCluster) -> Iterator[None]:
    yield
    cluster.kubectl("delete", "crd", "localqueues.kueue.x-k8s.io", "--ignore-not-found")


def test_tenants_onboarded_from_values(
    cluster: LocalCluster, release: None, kueue_crd: None, tmp_path: Path
) -> None:
    for ns in (WATCHED, TENANT_B):  # tenant-b's namespace is the platform team's own
        cluster.kubectl("create", "namespace", ns, check=False)
    values = values_file(
        tmp_path,
        {
            "operator": {
                "watchNamespaces": [WATCHED],
                "dataAllowlist": {TENANT_A: ["s3://shared/"]},
            },
            "tenants": [
                {
                    "name": TENANT_A,
                    "quota": {"gpus": 4, "cpu": "8", "memory": "32Gi", "pods": 20},
                    "kueue": {"localQueue": TENANT_A, "clusterQueue": "gpu-pool"},
                    "editors": [{"kind": "Group", "name": "tenant-a-ml"}],
                    "viewers": [{"kind": "User", "name": "vera"}],
                    "dataPrefixes": ["s3://lake/tenant-a/"],
                },
                {
                    "name": TENANT_B,
                    "createNamespace": False,
                    "quota": {"gpus": 1, "gpuResource": "amd.com/gpu"},
                },
            ],
        },
    )

    # Without Kueue: refused before anything is created, with a message naming the tenant.
    cluster.kubectl("delete", "crd", "localqueues.kueue.x-k8s.io", "--ignore-not-found")
    refused = helm(
        cluster,
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "-n",
        RELEASE_NS,
        "-f",
        values,
        check=False,
    )
    assert refused.returncode != 0
    assert (
        f"tenants[{TENANT_A}].kueue: the cluster serves no Kueue LocalQueue API" in refused.stderr
    )
    assert cluster.kubectl("get", "namespace", TENANT_A, check=False).returncode != 0

    cluster.kubectl("apply", "-f", "-", input=json.dumps(KUEUE_CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/localqueues.kueue.x-k8s.io")
    out = _install(cluster, "-f", values)
    assert f"- {TENANT_A} (namespace created, kept on uninstall)" in out.stdout  # NOTES.txt
    assert f"kubectl apply -n {TENANT_A} -f examples/02-train-tabular/" in out.stdout

    namespace = kubectl_json(cluster, "namespace", TENANT_A)
    assert namespace["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"

    quota_a = kubectl_json(cluster, "resourcequota", "kubeloop-tenant", "-n", TENANT_A)
    assert quota_a["spec"]["hard"] == {
        "requests.nvidia.com/gpu": "4",
        "requests.cpu": "8",
        "requests.memory": "32Gi",
        "pods": "20",
    }
    quota_b = kubectl_json(cluster, "resourcequota", "kubeloop-tenant", "-n", TENANT_B)
    assert quota_b["spec"]["hard"] == {"requests.amd.com/gpu": "1"}

    queue = kubectl_json(cluster, "localqueue", TENANT_A, "-n", TENANT_A)
    assert queue["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    assert queue["spec"] == {"clusterQueue": "gpu-pool"}

    # The RoleBindings name ClusterRoles that exist, and they work.
    bindings = {
        b["metadata"]["name"]: b
        for b in kubectl_json(cluster, "rolebindings", "-n", TENANT_A)["items"]
        if b["roleRef"]["kind"] == "ClusterRole"
    }
    assert {n: b["roleRef"]["name"] for n, b in bindings.items()} == {
        "kubeloop-edit": "kubeloop-edit",
        "kubeloop-view": "kubeloop-view",
    }
    for binding in bindings.values():
        kubectl_json(cluster, "clusterrole", binding["roleRef"]["name"])
    editor = ("--as-group=tenant-a-ml", "--as-group=system:authenticated")
    assert can(cluster, "ed", "create", "trainingruns.kubeloop.dev", "-n", TENANT_A, *editor)
    assert not can(cluster, "ed", "create", "trainingruns.kubeloop.dev", "-n", TENANT_B, *editor)
    assert can(cluster, "vera", "get", "modelversions.kubeloop.dev", "-n", TENANT_A)
    assert not can(cluster, "vera", "create", "modelversions.kubeloop.dev", "-n", TENANT_A)

    # The operator watches the tenants too (namespaced mode), and is told their prefixes.
    operator = f"system:serviceaccount:{RELEASE_NS}:{SA_NAME}"
    for ns in (WATCHED, TENANT_A, TENANT_B):
        assert can(cluster, operator, "watch", "trainingruns.kubeloop.dev", "-n", ns), ns
        kubectl_json(cluster, "kopfpeering", "kubeloop", "-n", ns)
    container = kubectl_json(cluster, "deployment", "kubeloop", "-n", RELEASE_NS)["spec"][
        "template"
    ]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert json.loads(env["KUBELOOP_NAMESPACES"]) == [WATCHED, TENANT_A, TENANT_B]
    assert json.loads(env["KUBELOOP_DATA_ALLOWLIST"]) == {
        TENANT_A: ["s3://shared/", "s3://lake/tenant-a/"]
    }

    # The tenant's own things, then an uninstall: the namespace and they stay.
    cluster.kubectl("create", "configmap", "team-notes", "-n", TENANT_A, "--from-literal=a=b")
    out = _uninstall(cluster)
    assert out.returncode == 0, out.stderr
    assert f"[Namespace] {TENANT_A}" in out.stdout
    namespace = kubectl_json(cluster, "namespace", TENANT_A)
    assert namespace["status"]["phase"] == "Active"
    assert "deletionTimestamp" not in namespace["metadata"]
    kubectl_json(cluster, "configmap", "team-notes", "-n", TENANT_A)
    for ns in (TENANT_A, TENANT_B, WATCHED):
        cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_the_dashboard_config_map_installs_only_when_enabled(
    cluster: LocalCluster, release: None
) -> None:
    cluster.kubectl("create", "namespace", "kl-monitoring", check=False)
    _install(
        cluster, "--set", "dashboard.enabled=true", "--set", "dashboard.namespace=kl-monitoring"
    )
    config_map = kubectl_json(cluster, "configmap", "kubeloop-dashboard", "-n", "kl-monitoring")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = config_map["data"].values()
    assert json.loads(text) == json.loads((CHART / "files" / "dashboard.json").read_text())
    _install(cluster, "--set", "dashboard.enabled=false")
    gone = cluster.kubectl(
        "get", "configmap", "kubeloop-dashboard", "-n", "kl-monitoring", check=False
    )
    assert gone.returncode != 0
    cluster.kubectl("delete", "namespace", "kl-monitoring", "--wait=false")
