"""`make demo`: the loop on the embedded local control plane.

1. TrainingRun (examples/02): the operator compiles the spec into a KFP pipeline, runs it with
   the local executor (kfp.local), shows step and trial progress, and registers the model.
2. ModelVersion (examples/01): the registry verifies artifacts and keeps one holder per alias.
3. ModelDeployment (examples/03): a metric-gated canary promotes a good version and rolls a
   broken one back under real traffic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hack import prometheus as prometheus_mod  # noqa: E402
from hack.cluster import cluster as cluster_mod  # noqa: E402
from kubeloop.backends.serving_local import LocalServingBackend  # noqa: E402
from kubeloop.serving.samples import (  # noqa: E402
    breast_cancer_rows,
    train_tabular_model,
    write_broken_model,
)

NAMESPACE = "kubeloop-demo"
ARTIFACTS = Path(os.environ.get("KUBELOOP_ARTIFACT_ROOT", "/tmp/kubeloop/artifacts"))


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def kubectl(
    cluster: cluster_mod.Cluster, *args: str, check: bool = True, stdin: str | None = None
) -> str:
    out = subprocess.run(
        [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=False,
        input=stdin,
    )
    if check and out.returncode:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def show(cluster: cluster_mod.Cluster, *args: str, stdin: str | None = None) -> None:
    print(kubectl(cluster, *args, stdin=stdin), end="", flush=True)


def write_artifacts() -> None:
    """Real models for the example versions (a TrainingRun will produce them; until then the
    demo trains small torch MLPs itself) and a third one that fails at inference."""
    folder = ARTIFACTS / NAMESPACE / "churn"
    for version in (1, 2):
        if not (folder / f"v{version}" / "model.json").exists():
            train_tabular_model(folder / f"v{version}", seed=version)
    write_broken_model(folder / "v3")


def wait_ready(cluster: cluster_mod.Cluster, names: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = kubectl(cluster, "get", "mv", "-n", NAMESPACE, "-o", "json")
        items = {i["metadata"]["name"]: i for i in json.loads(out)["items"]}
        if all(
            items.get(n, {}).get("status", {}).get("phase") == "Ready"
            and items[n]["status"].get("observedGeneration") == items[n]["metadata"]["generation"]
            for n in names
        ):
            return
        time.sleep(0.5)
    raise SystemExit(f"ModelVersions {names} not Ready after {timeout}s")


def fresh_namespace(cluster: cluster_mod.Cluster) -> None:
    """Start from an empty namespace so the demo tells the same story every run."""
    names = kubectl(cluster, "get", "md,tr,mv", "-n", NAMESPACE, "-o", "name", check=False).split()
    for name in names:  # an earlier run that was interrupted may have left finalizers
        kubectl(
            cluster,
            "patch",
            name,
            "-n",
            NAMESPACE,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )
    kubectl(cluster, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s")
    kubectl(cluster, "create", "namespace", NAMESPACE)


class Traffic(threading.Thread):
    """Steady, bounded client load on the deployment's URL (127.0.0.1 only)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stopped, self.codes = url, threading.Event(), Counter[int]()
        row = breast_cancer_rows(1)[0]
        self.body = json.dumps(
            {
                "id": "demo",
                "inputs": [{"name": "x", "shape": [1, len(row)], "datatype": "FP32", "data": row}],
            }
        ).encode()

    def run(self) -> None:
        for _ in range(50_000):
            if self.stopped.is_set():
                return
            request = urllib.request.Request(
                self.url,
                data=self.body,
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    self.codes[resp.status] += 1
            except urllib.error.HTTPError as exc:
                self.codes[exc.code] += 1
            except OSError:
                self.codes[0] += 1
            time.sleep(0.02)


def watch(
    cluster: cluster_mod.Cluster,
    resource: str,
    describe: Callable[[dict[str, Any]], str],
    until: Callable[[dict[str, Any]], bool],
    what: str,
    *,
    timeout: float = 240,
    since: float | None = None,
) -> dict[str, Any]:
    """Print each new state of ``resource`` (like `kubectl get -w`, optionally with the seconds
    since ``since``) until ``until(status)``; returns that status."""
    last, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = json.loads(
            kubectl(cluster, "get", *resource.split("/"), "-n", NAMESPACE, "-o", "json")
        )
        st = obj.get("status") or {}
        line = describe(st)
        if line != last:
            prefix = "" if since is None else f"{time.monotonic() - since:6.1f}s "
            print(f"{prefix}{line}", flush=True)
            last = line
        if until(st):
            return dict(st)
        time.sleep(0.5)
    raise SystemExit(f"{resource} did not reach {what} in {timeout:.0f}s")


def follow(
    cluster: cluster_mod.Cluster,
    until: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 240,
) -> dict[str, Any]:
    """The deployment's stable/canary/weight as the rollout moves."""

    def describe(st: dict[str, Any]) -> str:
        return (
            f"  stable={st.get('stable', {}).get('modelVersion')} "
            f"canary={st.get('canary', {}).get('modelVersion') or '-'} "
            f"weight={st.get('canary', {}).get('weight', 0)}% phase={st.get('phase')}"
        )

    return watch(cluster, "md/churn", describe, until, what, timeout=timeout)


def start_operator(
    cluster: cluster_mod.Cluster, prom: prometheus_mod.Prom
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBELOOP_ARTIFACT_ROOT": str(ARTIFACTS),
        "KUBELOOP_METRICS_PORT": "0",
        "KUBELOOP_PROMETHEUS_URL": prom.url,
        "KUBELOOP_SCRAPE_TARGETS_DIR": str(prom.targets_dir),
        "KUBELOOP_STATE_DIR": str(cluster.state_dir / "operator-state"),
        "KUBELOOP_EXECUTOR": "local",
    }
    with (cluster.state_dir / "operator-demo.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kubeloop", "operator", "-n", NAMESPACE, "--liveness="],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def training_story(cluster: cluster_mod.Cluster) -> None:
    say("kubectl apply -f examples/02-train-tabular/  (fraud MLP: focal loss, TPE tuning, gates)")
    started = time.monotonic()
    show(cluster, "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "02-train-tabular"))

    def describe(st: dict[str, Any]) -> str:
        return (
            f"  phase={st.get('phase')} step={st.get('currentStep') or '-'} "
            f"trials={st.get('trials', {}).get('progress') or '-'} "
            f"best={st.get('bestMetric') or '-'}"
        )

    def finished(st: dict[str, Any]) -> bool:
        return st.get("phase") in ("Succeeded", "Failed")

    st = watch(cluster, "tr/fraud-mlp", describe, finished, "an end", timeout=600, since=started)
    took = time.monotonic() - started
    show(cluster, "get", "tr", "-n", NAMESPACE, "-o", "wide")
    if st.get("phase") != "Succeeded":
        ready: dict[str, Any] = next(
            (c for c in st.get("conditions", []) if c["type"] == "Ready"), {}
        )
        raise SystemExit(f"the training run did not succeed: {ready.get('message')}")
    print(f"trained, evaluated, explained and registered in {took:.0f}s")
    print(f"test metrics: {json.dumps(st.get('metrics'), indent=None)}")
    print(f"best hyperparameters: {json.dumps(st.get('trials', {}).get('bestParams'))}")
    say("where the model, metrics and plots are")
    for key, uri in sorted((st.get("artifacts") or {}).items()):
        print(f"  {key:28s} {uri}")
    show(cluster, "get", "mv", st["modelVersion"], "-n", NAMESPACE)
    out = kubectl(cluster, "describe", "tr", "fraud-mlp", "-n", NAMESPACE)
    print(out[out.index("Events:") :] if "Events:" in out else out, flush=True)


def registry_story(cluster: cluster_mod.Cluster) -> None:
    say("kubectl apply -f examples/01-register-a-model/")
    show(cluster, "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "01-register-a-model"))
    wait_ready(cluster, ["churn-v1", "churn-v2"])
    show(cluster, "get", "mv", "-n", NAMESPACE)


def rollout_story(cluster: cluster_mod.Cluster, traffic: list[Traffic]) -> None:
    say("kubectl apply -f examples/03-canary-deployment/  (interval shortened to 5s)")
    manifest = yaml.safe_load(
        (ROOT / "examples" / "03-canary-deployment" / "modeldeployment.yaml").read_text()
    )
    manifest["spec"]["rollout"]["interval"] = "5s"
    manifest["spec"]["rollout"]["analysis"]["minRequests"] = 20
    show(cluster, "apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump(manifest))
    st = follow(cluster, lambda s: s.get("phase") == "Serving", "Serving")
    traffic.append(Traffic(st["url"]))
    traffic[0].start()
    print(f"sending traffic to {st['url']}")

    say(
        "promote churn-v2: it claims 'production'; the registry moves the alias and the "
        "deployment canaries it"
    )
    show(
        cluster,
        "patch",
        "mv",
        "churn-v2",
        "-n",
        NAMESPACE,
        "--type=merge",
        "-p",
        '{"spec":{"aliases":["production","latest"]}}',
    )
    follow(
        cluster,
        lambda s: s.get("stable", {}).get("modelVersion") == "churn-v2",
        "churn-v2 promoted",
    )

    say("register a broken churn-v3 as production: its canary fails and is rolled back")
    show(
        cluster,
        "apply",
        "-n",
        NAMESPACE,
        "-f",
        "-",
        stdin=yaml.safe_dump(
            {
                "apiVersion": "kubeloop.dev/v1alpha1",
                "kind": "ModelVersion",
                "metadata": {"name": "churn-v3"},
                "spec": {
                    "modelName": "churn",
                    "version": 3,
                    "aliases": ["production"],
                    "artifact": {"uri": f"file://{ARTIFACTS / NAMESPACE / 'churn' / 'v3'}"},
                },
            }
        ),
    )
    follow(cluster, lambda s: s.get("phase") == "RolledBack", "a rollback")
    print(f"client responses during the demo: {dict(traffic[0].codes)}")
    show(cluster, "get", "kubeloop", "-n", NAMESPACE)

    say("the story in Events (kubectl describe md churn)")
    out = kubectl(cluster, "describe", "md", "churn", "-n", NAMESPACE)
    print(out[out.index("Events:") :] if "Events:" in out else out, flush=True)
    say("the registry index (ConfigMap kubeloop-registry-churn)")
    print(
        kubectl(
            cluster,
            "get",
            "configmap",
            "kubeloop-registry-churn",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.data.index\\.json}",
        )
    )
    # Stop the model servers while the operator still runs (it owns them).
    kubectl(cluster, "delete", "md", "churn", "-n", NAMESPACE, "--timeout=60s")


def main() -> int:
    say("local control plane")
    cluster = cluster_mod.up(cluster_mod.default_state_dir())
    show(cluster, "get", "nodes")
    say("installing the CRDs (generated from the pydantic models)")
    show(cluster, "apply", "--server-side", "-f", str(ROOT / "crds"))
    kubectl(cluster, "wait", "--for=condition=Established", "crd", "--all")
    prom_state = cluster.state_dir / "prometheus"
    LocalServingBackend(cluster.state_dir / "operator-state", prom_state / "targets").stop_all()
    fresh_namespace(cluster)
    say("training two small models (torch MLPs on scikit-learn's breast-cancer data)")
    write_artifacts()
    prom = prometheus_mod.up(prom_state, targets_dir=prom_state / "targets", scrape_interval="1s")
    print(f"Prometheus at {prom.url}")
    say(f"starting the operator (watching namespace {NAMESPACE})")
    operator = start_operator(cluster, prom)
    traffic: list[Traffic] = []
    try:
        training_story(cluster)
        registry_story(cluster)
        rollout_story(cluster, traffic)
    finally:
        for client in traffic:
            client.stopped.set()
        operator.terminate()
        operator.wait(30)
        prometheus_mod.down(prom_state)

    say("done")
    print(f"operator log:  {cluster.state_dir / 'operator-demo.log'}")
    print(f"artifacts:     {ARTIFACTS / NAMESPACE}")
    print(
        f"explore:       export KUBECONFIG={cluster.kubeconfig} "
        f"PATH={cluster.bin_dir}:$PATH; kubectl get kubeloop -A"
    )
    print("stop:          make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
