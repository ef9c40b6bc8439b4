"""`make demo`'s install step: kubeloop installed by its Helm chart, the operator launched from it.

A platform team installs kubeloop with the chart; so does the demo, through hack/helm.py
(pyhelm3), as release ``kubeloop`` in ``kubeloop-system`` with the demo namespace as its tenant.
There is no container runtime here, so the chart's Deployment runs no pod: the operator runs as a
local process started from that Deployment's own args and KUBELOOP_* environment, changed only
where this control plane forces it (each change is printed, with why). It authenticates with a
TokenRequest token of the chart's ServiceAccount, so the chart's RBAC is what the loop runs under.
The API server cannot reach an in-cluster Service here, so registering the admission webhook for
the local process is part of the install: the demo does it with its admin rights, as an
installer would, because the chart's RBAC grants the operator no webhook configurations.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from hack import loop
from hack import prometheus as prometheus_mod
from hack.cluster import cluster as cluster_mod
from hack.helm import CHART, Helm, Revision
from kubeloop.backends.webhook_certs import TlsFiles, self_signed
from kubeloop.planning import webhook

NAMESPACE = "kubeloop-demo"  # the release's tenant: the story runs there
ARTIFACTS = Path(os.environ.get("KUBELOOP_ARTIFACT_ROOT", "/tmp/kubeloop/artifacts"))
RELEASE, SYSTEM = "kubeloop", "kubeloop-system"  # the Helm release and its namespace
# The webhook configuration the demo registers for its operator (the name the operator's own
# registration used, so one left behind by an older demo is replaced).
WEBHOOK_CONFIGURATION = f"kubeloop-local-{NAMESPACE}"


@dataclass(frozen=True)
class Override:
    """A chart setting the local control plane makes the demo change."""

    setting: str
    chart: str
    here: str
    why: str


@dataclass(frozen=True)
class Launch:
    """How the operator process starts: the chart's settings with the local overrides."""

    argv: list[str]
    env: dict[str, str]
    overrides: list[Override]
    webhook_port: int
    webhook_tls: TlsFiles


def chart_values(prom: prometheus_mod.Prom) -> dict[str, Any]:
    """What a platform team sets to install kubeloop on this control plane."""
    return {
        # No container runtime: the operator runs as a local process (start_operator).
        "replicas": 0,
        "operator": {
            "watchNamespaces": [NAMESPACE],
            # The embedded KFP runner and local model servers: no Kubeflow, no KServe here.
            "executor": "local",
            "servingBackend": "local",
            "prometheusUrl": prom.url,
        },
        "tenants": [{"name": NAMESPACE}],
        # The API server cannot reach an in-cluster Service here (no pods, no Service
        # network): the demo registers a webhook configuration for its local operator instead.
        "webhook": {"enabled": False},
    }


def install(cluster: cluster_mod.Cluster, k: loop.Kubectl, values: dict[str, Any]) -> Revision:
    """helm upgrade --install (pyhelm3): a second run upgrades the release. take_ownership
    adopts the CRDs an older demo applied with kubectl; recover, a release an interrupted demo
    left pending."""
    helm = Helm(cluster.kubeconfig, cluster.bin_dir)
    release = asyncio.run(
        helm.install_or_upgrade(RELEASE, SYSTEM, values, take_ownership=True, recover=True)
    )
    k.run("wait", "--for=condition=Established", "crd", "--all")
    return release


def service_account_kubeconfig(cluster: cluster_mod.Cluster, k: loop.Kubectl) -> Path:
    """A kubeconfig with a TokenRequest token of the chart's ServiceAccount (the token a pod
    would have mounted), so the chart's RBAC is what the loop runs under."""
    system = loop.Kubectl(k.binary, k.kubeconfig, SYSTEM)
    token = system.run("create", "token", RELEASE, "--duration=2h").strip()
    path = cluster.state_dir / "operator-kubeconfig"
    path.touch(mode=0o600)
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "operator",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {
                            "server": cluster.server,
                            "certificate-authority": str(cluster.state_dir / "pki" / "ca.crt"),
                        },
                    }
                ],
                "users": [{"name": f"{SYSTEM}:{RELEASE}", "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "operator",
                        "context": {"cluster": "local", "user": f"{SYSTEM}:{RELEASE}"},
                    }
                ],
            }
        )
    )
    return path


def operator_launch(
    cluster: cluster_mod.Cluster,
    prom: prometheus_mod.Prom,
    release: Revision,
    kubeconfig: Path,
) -> Launch:
    """The operator's process from the chart's Deployment: its args and its KUBELOOP_*
    environment, changed only where this control plane forces it."""
    deployment = release.resource("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    chart_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    from_pod = [e["name"] for e in container["env"] if "value" not in e]
    state = cluster.state_dir / "operator-state"
    port = cluster_mod._free_port()
    # The webhook's certificate: the chart's is for its Service's name, ours for 127.0.0.1.
    tls = self_signed(state / "webhook")
    local: dict[str, tuple[str, str]] = {
        "KUBELOOP_METRICS_PORT": ("0", "a process shares the host's ports"),
        "KUBELOOP_ARTIFACT_ROOT": (str(ARTIFACTS), "where the demo writes the data"),
        "KUBELOOP_STATE_DIR": (str(state), "local runs and model servers"),
        "KUBELOOP_SCRAPE_TARGETS_DIR": (str(prom.targets_dir), "the demo's Prometheus reads it"),
        "KUBELOOP_VERIFY_LOCAL_ARTIFACTS": ("true", "trainers share the operator's disk"),
        "KUBELOOP_WEBHOOK_PORT": (str(port), "the demo registers the webhook"),
        "KUBELOOP_WEBHOOK_CERT_DIR": (str(tls.cert.parent), "a CA of its own, for 127.0.0.1"),
    }
    liveness = next(a for a in container["args"] if a.startswith("--liveness="))
    overrides = [
        Override(
            "replicas",
            str(_chart_default("replicas")),
            str(deployment["spec"]["replicas"]),
            "no container runtime: a local process",
        ),
        Override(
            "credentials",
            "the pod's SA token",
            f"TokenRequest, SA {RELEASE}",
            "so the chart's RBAC applies",
        ),
        Override(
            "webhook config",
            "the chart's (Service)",
            f"127.0.0.1:{port} (demo's)",
            "no Service network; admin registers",
        ),
        *(
            Override(name.removeprefix("KUBELOOP_"), chart_env.get(name, "(unset)"), value, why)
            for name, (value, why) in local.items()
            if chart_env.get(name) != value
        ),
        *(Override(name, "(fieldRef)", "(unset)", "no pod: kopf's own id") for name in from_pod),
        Override("--liveness", liveness.split(":")[-1], "off", "no kubelet probes it"),
    ]
    args = [a for a in container["args"] if a != liveness]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBELOOP_")},
        **chart_env,
        **{name: value for name, (value, _) in local.items()},
        "KUBECONFIG": str(kubeconfig),
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "kubeloop", *args, "--liveness="]  # the image's entrypoint
    return Launch(argv, env, overrides, port, tls)


def _chart_default(key: str) -> Any:
    return yaml.safe_load((CHART / "values.yaml").read_text())[key]


def show_install(
    console: Console, release: Revision, values: dict[str, Any], launch: Launch, state: Path
) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    console.print(
        f"helm (pyhelm3): release {RELEASE} revision {release.number} {release.status} in "
        f"{SYSTEM}, chart {chart['name']}-{chart['version']}"
    )
    console.print("values: " + ", ".join(f"{k}={v}" for k, v in _dotted(values)))
    table = Table(
        title="the operator runs from the chart's settings (KUBELOOP_*), except",
        caption=f"<state> = {str(state).replace(str(Path.home()), '~')}",
        box=box.SIMPLE_HEAD,
    )
    for column in ("setting", "chart", "here"):
        table.add_column(column, no_wrap=True)
    table.add_column("why")
    for o in launch.overrides:
        table.add_row(o.setting, o.chart, o.here.replace(str(state), "<state>"), o.why)
    console.print(table)


def _dotted(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", json.dumps(value).replace('"', "")


def start_operator(cluster: cluster_mod.Cluster, launch: Launch) -> subprocess.Popen[bytes]:
    with (cluster.state_dir / "operator-demo.log").open("ab") as log:
        return subprocess.Popen(launch.argv, env=launch.env, stdout=log, stderr=subprocess.STDOUT)


def register_webhook(
    k: loop.Kubectl, launch: Launch, operator: subprocess.Popen[bytes], log: Path
) -> None:
    """Point the API server at the operator's webhook, once it listens (registered earlier, a
    create in between would be refused for want of an answer). With the demo's admin rights:
    the chart's RBAC grants the operator no webhook configurations."""

    def listening() -> bool:
        if operator.poll() is not None:
            raise SystemExit(f"the operator exited ({operator.returncode}):\n{_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", launch.webhook_port), timeout=1).close()
        except OSError:
            return False
        return True

    loop.wait(listening, within=60, what="the operator's webhook server")
    k.apply(
        webhook.configuration(
            WEBHOOK_CONFIGURATION,
            url=f"https://127.0.0.1:{launch.webhook_port}",
            ca_bundle=base64.b64encode(launch.webhook_tls.ca.read_bytes()).decode(),
            namespaces=[NAMESPACE],
        )
    )


def unregister_webhook(k: loop.Kubectl) -> None:
    k.run("delete", "validatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found")


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextmanager
def installed_operator(
    console: Console, cluster: cluster_mod.Cluster, k: loop.Kubectl, prom: prometheus_mod.Prom
) -> Iterator[subprocess.Popen[bytes]]:
    """Install the chart, start the operator from its settings as its ServiceAccount and
    register its webhook; on the way out, unregister the webhook and stop the operator."""
    console.rule("install: the kubeloop chart, as a platform team does")
    started = time.monotonic()
    values = chart_values(prom)
    release = install(cluster, k, values)
    launch = operator_launch(cluster, prom, release, service_account_kubeconfig(cluster, k))
    log = cluster.state_dir / "operator-demo.log"
    operator = start_operator(cluster, launch)
    try:
        register_webhook(k, launch, operator, log)
        show_install(console, release, values, launch, cluster.state_dir)
        console.print(f"installed, operator up and admitting in {time.monotonic() - started:.1f}s")
        yield operator
    finally:
        unregister_webhook(k)
        operator.terminate()
        operator.wait(30)
