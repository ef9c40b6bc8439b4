"""The Helm chart: lint, render, schema, least privilege, and a real install."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hack.helm import Helm

from kubeloop.planning import webhook
from tests.conftest import ROOT
from tests.integration.conftest import LocalCluster
from tests.unit.test_rbac_usage import CLUSTER_SCOPED, describe, expand, used_permissions

CHART = ROOT / "charts" / "kubeloop"
SNAPSHOT = ROOT / "tests" / "snapshots" / "chart-default.yaml"


# Installs, upgrades and uninstalls go through pyhelm3 (hack/helm.py). Lint and the renders stay
# on the helm binary (with the same private Helm directories): pyhelm3 0.5.8 has no lint, and
# its template passes no --kube-version (helm's default, v1.20, is below the chart's
# kubeVersion), takes no --set, and returns parsed documents where the snapshot compares text.
def helm(cluster: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return Helm(cluster.kubeconfig, cluster.bin_dir).command(*args, check=check)


def render(cluster: LocalCluster, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return Helm(cluster.kubeconfig, cluster.bin_dir).template(values or {}, kube_version="1.35.4")


def test_lint_is_clean(cluster: LocalCluster) -> None:
    out = Helm(cluster.kubeconfig, cluster.bin_dir).lint()
    assert "0 chart(s) failed" in out.stdout


# The webhook's CA and certificate are generated anew on every render (genCA): the snapshot
# holds a placeholder for them, and test_webhook_certificate_is_valid checks the real ones.
_GENERATED = re.compile(r"^(\s*(?:tls\.crt|tls\.key|ca\.crt|caBundle):) \S+$", re.MULTILINE)


def mask_generated(text: str) -> str:
    return _GENERATED.sub(r"\1 <generated>", text)


def test_default_render_matches_snapshot(cluster: LocalCluster) -> None:
    """Everything but the CRDs (those are golden-checked by `make crds-check`)."""
    args = ("template", "kubeloop", str(CHART), "--kube-version", "1.35.4")
    rendered = helm(cluster, *args, "-n", "kubeloop-system", "--set", "crds.enabled=false")
    masked = mask_generated(rendered.stdout)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(masked)
    assert SNAPSHOT.exists(), "no snapshot yet: run UPDATE_SNAPSHOTS=1 make test"
    assert masked == SNAPSHOT.read_text(), "run UPDATE_SNAPSHOTS=1 make test to accept"


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
        "kubeloop-operator-cluster",
        "kubeloop-view",
        "kubeloop-edit",
    }
    namespaced = render(cluster, {"operator": {"watchNamespaces": ["team-a"]}})
    roles += [d for d in namespaced if d["kind"] in ("ClusterRole", "Role")]
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"], rule
            assert "*" not in rule["resources"], rule
            assert "secrets" not in rule["resources"], rule
            if "customresourcedefinitions" in rule["resources"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


def _operator_grants(docs: list[dict[str, Any]]) -> dict[str, set[tuple[str, str, str]]]:
    """The operator ServiceAccount's grants, by scope: "cluster" (ClusterRoles it is bound to
    cluster-wide) and each namespace it has a RoleBinding in."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    grants: dict[str, set[tuple[str, str, str]]] = {}
    for binding in [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]:
        if not any(s.get("kind") == "ServiceAccount" for s in binding["subjects"]):
            continue
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace")
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else ns
        grants.setdefault(scope, set()).update(expand(role["rules"]))
    return grants


@pytest.mark.parametrize("namespaced", [False, True], ids=["cluster-wide", "namespaced"])
def test_operator_rbac_is_exactly_what_the_code_calls(
    cluster: LocalCluster, namespaced: bool
) -> None:
    """The operator's roles grant what the code and kopf call (tests/unit/test_rbac_usage.py
    derives it), nothing more and nothing less; namespaced, every namespaced right is in a
    Role in each watched namespace and only cluster-scoped reads are cluster-wide."""
    values = {"operator": {"watchNamespaces": ["team-a", "team-b"]}} if namespaced else {}
    grants = _operator_grants(render(cluster, values))
    used = used_permissions(namespaced=namespaced)
    granted = set().union(*grants.values())
    assert granted == used, (
        f"granted, never called:\n{describe(granted - used)}\n"
        f"called, not granted:\n{describe(used - granted)}"
    )
    if namespaced:
        assert set(grants) == {"cluster", "team-a", "team-b"}
        assert {r for _, r, _ in grants["cluster"]} <= CLUSTER_SCOPED, describe(grants["cluster"])
        in_namespace = {p for p in used if p[1] not in CLUSTER_SCOPED}
        assert grants["team-a"] == grants["team-b"] == in_namespace
    else:
        assert set(grants) == {"cluster"}


def _webhook_docs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["kind"]: d
        for d in docs
        if d["kind"] == "ValidatingWebhookConfiguration"
        or d["metadata"]["name"] in ("kubeloop-webhook", "kubeloop-webhook-cert")
    }


def test_webhook_pieces(cluster: LocalCluster) -> None:
    docs = render(cluster, {"operator": {"watchNamespaces": ["team-b", "team-a"]}})
    pieces = _webhook_docs(docs)
    secret, service, config = (
        pieces["Secret"],
        pieces["Service"],
        pieces["ValidatingWebhookConfiguration"],
    )
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert service["spec"]["ports"] == [{"name": "webhook", "port": 443, "targetPort": "webhook"}]
    # The same webhooks the operator registers itself on the local control plane, but reached
    # through the chart's Service and with the chart's CA.
    local = webhook.configuration(
        "kubeloop", url="https://x", ca_bundle="", namespaces=["team-a", "team-b"]
    )
    for ours, theirs in zip(config["webhooks"], local["webhooks"], strict=True):
        path = "/" + ours["name"].removesuffix(".kubeloop.dev")
        assert ours.pop("clientConfig") == {
            "service": {
                "name": "kubeloop-webhook",
                "namespace": "kubeloop-system",
                "port": 443,
                "path": path,
            },
            "caBundle": secret["data"]["ca.crt"],
        }
        theirs.pop("clientConfig")
        ours["namespaceSelector"]["matchExpressions"][0]["values"].sort()
        assert ours == theirs
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBELOOP_WEBHOOK_PORT"] == "9443"
    assert env["KUBELOOP_WEBHOOK_CERT_DIR"] == "/etc/kubeloop/webhook"
    assert "KUBELOOP_WEBHOOK_REGISTER" not in env  # the chart ships the configuration
    assert {"name": "webhook", "containerPort": 9443} in container["ports"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "webhook-cert")
    assert mount == {"name": "webhook-cert", "mountPath": "/etc/kubeloop/webhook", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "webhook-cert")
    assert volume["secret"]["secretName"] == "kubeloop-webhook-cert"

    # Cluster-wide: no namespace selector; the policy and timeout follow the values.
    config = _webhook_docs(
        render(cluster, {"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 5}})
    )["ValidatingWebhookConfiguration"]
    assert all("namespaceSelector" not in w for w in config["webhooks"])
    assert {(w["failurePolicy"], w["timeoutSeconds"]) for w in config["webhooks"]} == {
        ("Ignore", 5)
    }
    off = render(cluster, {"webhook": {"enabled": False}})
    assert not _webhook_docs(off)
    container = next(d for d in off if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert not [e for e in container["env"] if e["name"].startswith("KUBELOOP_WEBHOOK")]


def test_webhook_certificate_is_valid(cluster: LocalCluster, tmp_path: Path) -> None:
    """The generated certificate is signed by the CA in the bundle, for the Service's name."""
    pieces = _webhook_docs(render(cluster))
    data = pieces["Secret"]["data"]
    for key in ("tls.crt", "ca.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(data[key]))
    assert (
        pieces["ValidatingWebhookConfiguration"]["webhooks"][0]["clientConfig"]["caBundle"]
        == data["ca.crt"]
    )
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp_path / "tls.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:kubeloop-webhook.kubeloop-system.svc" in text
    assert "DNS:kubeloop-webhook.kubeloop-system.svc.cluster.local" in text


def test_pod_is_restricted_and_crds_are_kept(cluster: LocalCluster) -> None:
    docs = render(cluster)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    # kubeloop's four, and kopf's two peering CRDs (templates/kopf-peering-crds.yaml)
    assert len([c for c in crds if c["spec"]["group"] == "kubeloop.dev"]) == 4
    assert {c["spec"]["group"] for c in crds} == {"kubeloop.dev", "kopf.dev"}
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    assert not [
        d
        for d in render(cluster, {"crds": {"enabled": False}})
        if d["kind"] == "CustomResourceDefinition"
    ]
    extras = render(
        cluster,
        {
            "networkPolicy": {"enabled": True},
            "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        },
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


async def test_install_into_the_api_server(crds: LocalCluster, tmp_path: Path) -> None:
    """Installs for real (CRDs are already there, so crds.enabled=false) into a namespace that
    enforces the restricted Pod Security level; the real scheduler binds the pod to a kwok node."""
    cluster = crds
    ns = "kubeloop-system"
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.kubectl(
        "label", "--overwrite", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted"
    )
    # Namespaced mode puts a Role in each watched namespace: they must exist first.
    cluster.kubectl("create", "namespace", "team-a", check=False)
    helm = Helm(cluster.kubeconfig, cluster.bin_dir)
    values = {"crds": {"enabled": False}, "operator": {"watchNamespaces": ["team-a"]}}
    try:
        await _install_and_check(cluster, helm, ns, values)
    finally:
        await helm.uninstall("kubeloop", ns)


async def _install_and_check(
    cluster: LocalCluster, helm: Helm, ns: str, values: dict[str, Any]
) -> None:
    rev = await helm.install_or_upgrade("kubeloop", ns, values)
    assert rev.status == "deployed"
    assert "kubectl create rolebinding kubeloop-edit" in rev.notes  # NOTES.txt

    # An upgrade keeps the webhook's CA (lookup), so the caBundle still matches the mounted cert.
    def ca_bundle() -> tuple[str, str]:
        secret = cluster.kubectl(
            "get", "secret", "-n", ns, "kubeloop-webhook-cert", "-o", "jsonpath={.data.ca\\.crt}"
        ).stdout
        bundle = cluster.kubectl(
            "get",
            "validatingwebhookconfiguration",
            "kubeloop",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ).stdout
        return secret, bundle

    before = ca_bundle()
    assert before[0]
    assert before[0] == before[1]
    assert (await helm.install_or_upgrade("kubeloop", ns, values)).number == 2
    assert ca_bundle() == before

    def pod_created() -> str:
        return cluster.kubectl("get", "pods", "-n", ns, "-o", "name").stdout.strip()

    assert _wait(pod_created), "the restricted namespace refused the operator pod"
    sa = f"system:serviceaccount:{ns}:kubeloop"

    def can(verb: str, resource: str, *extra: str, who: str = sa) -> bool:
        res = cluster.kubectl("auth", "can-i", verb, resource, f"--as={who}", *extra, check=False)
        return res.stdout.strip() == "yes"

    assert can("watch", "modelversions.kubeloop.dev", "-n", "team-a")
    assert not can("watch", "modelversions.kubeloop.dev", "-A")  # namespaced mode
    assert can("patch", "modelversions.kubeloop.dev/status", "-n", "team-a")
    assert not can("get", "secrets", "-A")
    assert not can("create", "customresourcedefinitions.apiextensions.k8s.io")
    assert not can("delete", "customresourcedefinitions.apiextensions.k8s.io")

    # A tenant bound to the built-in edit role gets kubeloop rights through aggregation.
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
