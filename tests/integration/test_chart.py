"""The Helm chart: lint, render, schema, least privilege, and a real install."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.integration.conftest import LocalCluster

CHART = ROOT / "charts" / "kubeloop"
SNAPSHOT = ROOT / "tests" / "snapshots" / "chart-default.yaml"


def helm(cluster: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.bin_dir / "helm"), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
        env={
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "HELM_CACHE_HOME": "/tmp/kubeloop-helm/cache",
            "HELM_CONFIG_HOME": "/tmp/kubeloop-helm/config",
            "HELM_DATA_HOME": "/tmp/kubeloop-helm/data",
        },
    )


def render(cluster: LocalCluster, *args: str) -> list[dict[str, Any]]:
    out = helm(
        cluster,
        "template",
        "kubeloop",
        str(CHART),
        "--kube-version",
        "1.35.4",
        "-n",
        "kubeloop-system",
        *args,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_lint_is_clean(cluster: LocalCluster) -> None:
    out = helm(cluster, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout


def test_default_render_matches_snapshot(cluster: LocalCluster) -> None:
    """Everything but the CRDs (those are golden-checked by `make crds-check`)."""
    args = ("template", "kubeloop", str(CHART), "--kube-version", "1.35.4")
    rendered = helm(cluster, *args, "-n", "kubeloop-system", "--set", "crds.enabled=false")
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(rendered.stdout)
    assert SNAPSHOT.exists(), "no snapshot yet: run UPDATE_SNAPSHOTS=1 make test"
    assert rendered.stdout == SNAPSHOT.read_text(), "run UPDATE_SNAPSHOTS=1 make test to accept"


def test_a_typo_in_values_fails_the_install(cluster: LocalCluster) -> None:
    out = helm(
        cluster,
        "template",
        "kubeloop",
        str(CHART),
        "--kube-version",
        "1.35.4",
        "--set",
        "operator.exectuor=kfp",
        check=False,
    )
    assert out.returncode != 0
    assert "exectuor" in out.stderr
    assert "additional properties 'exectuor' not allowed" in out.stderr


def test_rbac_is_least_privilege(cluster: LocalCluster) -> None:
    docs = render(cluster)
    roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert {r["metadata"]["name"] for r in roles} == {
        "kubeloop-operator",
        "kubeloop-view",
        "kubeloop-edit",
    }
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"], rule
            assert "*" not in rule["resources"], rule
            assert "secrets" not in rule["resources"], rule
            if "customresourcedefinitions" in rule["resources"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


def test_pod_is_restricted_and_crds_are_kept(cluster: LocalCluster) -> None:
    docs = render(cluster)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 4
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    assert not [
        d
        for d in render(cluster, "--set", "crds.enabled=false")
        if d["kind"] == "CustomResourceDefinition"
    ]
    extras = render(
        cluster,
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
    )
    assert {"NetworkPolicy", "ServiceMonitor", "PrometheusRule"} <= {d["kind"] for d in extras}


def test_chart_crds_equal_the_generated_ones(cluster: LocalCluster) -> None:
    from_chart = {
        d["metadata"]["name"]: d for d in render(cluster) if d["kind"] == "CustomResourceDefinition"
    }
    for path in (ROOT / "crds").glob("*.yaml"):
        generated = yaml.safe_load(path.read_text())
        chart = from_chart[generated["metadata"]["name"]]
        assert chart["spec"] == generated["spec"]


def _wait(check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_install_into_the_api_server(crds: LocalCluster, tmp_path: Path) -> None:
    """Installs for real (CRDs are already there, so crds.enabled=false) into a namespace that
    enforces the restricted Pod Security level; the real scheduler binds the pod to a kwok node."""
    cluster = crds
    ns = "kubeloop-system"
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.kubectl(
        "label", "--overwrite", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted"
    )
    out = helm(
        cluster,
        "upgrade",
        "--install",
        "kubeloop",
        str(CHART),
        "-n",
        ns,
        "--set",
        "crds.enabled=false",
        "--set",
        "operator.watchNamespaces={team-a}",
        "--wait=false",
    )
    assert "STATUS: deployed" in out.stdout
    assert "kubectl create rolebinding kubeloop-edit" in out.stdout  # NOTES.txt

    def pod_created() -> str:
        return cluster.kubectl("get", "pods", "-n", ns, "-o", "name").stdout.strip()

    assert _wait(pod_created), "the restricted namespace refused the operator pod"
    sa = f"system:serviceaccount:{ns}:kubeloop"

    def can(verb: str, resource: str, *extra: str, who: str = sa) -> bool:
        res = cluster.kubectl("auth", "can-i", verb, resource, f"--as={who}", *extra, check=False)
        return res.stdout.strip() == "yes"

    assert can("watch", "modelversions.kubeloop.dev", "-A")
    assert can("patch", "modelversions.kubeloop.dev/status", "-n", "team-a")
    assert not can("get", "secrets", "-A")
    assert not can("create", "customresourcedefinitions.apiextensions.k8s.io")
    assert not can("delete", "customresourcedefinitions.apiextensions.k8s.io")

    # A tenant bound to the built-in edit role gets kubeloop rights through aggregation.
    cluster.kubectl("create", "namespace", "team-a", check=False)
    cluster.kubectl(
        "create",
        "rolebinding",
        "alice-edit",
        "--clusterrole=edit",
        "--user=alice",
        "-n",
        "team-a",
        check=False,
    )
    assert _wait(lambda: can("create", "trainingruns.kubeloop.dev", "-n", "team-a", who="alice"))
    assert not can("create", "trainingruns.kubeloop.dev", "-n", "team-b", who="alice")
    helm(cluster, "uninstall", "kubeloop", "-n", ns)


@pytest.fixture(autouse=True)
def _helm_home() -> None:
    Path("/tmp/kubeloop-helm").mkdir(exist_ok=True)
