"""`make demo`: the loop on the embedded local control plane.

Today it shows the registry (ModelVersion): the operator verifies artifacts, keeps one holder
per alias, indexes each model, and tells the story through `kubectl get`, conditions and
Events. Later capabilities (TrainingRun, ModelDeployment, DriftPolicy) extend this script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hack.cluster import cluster as cluster_mod  # noqa: E402

NAMESPACE = "kubeloop-demo"
ARTIFACTS = Path(os.environ.get("KUBELOOP_ARTIFACT_ROOT", "/tmp/kubeloop/artifacts"))


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def kubectl(cluster: cluster_mod.Cluster, *args: str, check: bool = True) -> str:
    out = subprocess.run(
        [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if check and out.returncode:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def show(cluster: cluster_mod.Cluster, *args: str) -> None:
    print(kubectl(cluster, *args), end="", flush=True)


def write_artifacts() -> None:
    """Model folders for the example versions (TrainingRun will produce real ones)."""
    for version in (1, 2):
        folder = ARTIFACTS / NAMESPACE / "churn" / f"v{version}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "MODEL_CARD.json").write_text(
            json.dumps(
                {
                    "model": "churn",
                    "version": version,
                    "note": "registered by hand in the demo; a TrainingRun writes the weights here",
                },
                indent=2,
            )
        )


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


def main() -> int:
    say("local control plane")
    cluster = cluster_mod.up(cluster_mod.default_state_dir())
    show(cluster, "get", "nodes")
    say("installing the CRDs (generated from the pydantic models)")
    show(cluster, "apply", "--server-side", "-f", str(ROOT / "crds"))
    kubectl(cluster, "wait", "--for=condition=Established", "crd", "--all")
    kubectl(cluster, "create", "namespace", NAMESPACE, check=False)
    write_artifacts()

    say(f"starting the operator (watching namespace {NAMESPACE})")
    log_path = cluster.state_dir / "operator-demo.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBELOOP_ARTIFACT_ROOT": str(ARTIFACTS),
        "KUBELOOP_METRICS_PORT": "0",
    }
    with log_path.open("ab") as log:
        operator = subprocess.Popen(
            [sys.executable, "-m", "kubeloop", "operator", "-n", NAMESPACE, "--liveness="],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        say("kubectl apply -f examples/01-register-a-model/")
        show(
            cluster, "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "01-register-a-model")
        )
        wait_ready(cluster, ["churn-v1", "churn-v2"])
        show(cluster, "get", "kubeloop", "-n", NAMESPACE, "-o", "wide")

        say("promote v2: it claims 'production'; the operator takes it from v1")
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
        time.sleep(1)
        wait_ready(cluster, ["churn-v1", "churn-v2"])
        show(cluster, "get", "mv", "-n", NAMESPACE)

        say("the story in Events (kubectl describe mv churn-v2)")
        out = kubectl(cluster, "describe", "mv", "churn-v2", "-n", NAMESPACE)
        print(out[out.index("Events:") :] if "Events:" in out else out, flush=True)

        say("the registry index (ConfigMap kubeloop-registry-churn)")
        time.sleep(1)
        index = kubectl(
            cluster,
            "get",
            "configmap",
            "kubeloop-registry-churn",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.data.index\\.json}",
        )
        print(index)
    finally:
        operator.terminate()
        operator.wait(30)

    say("done")
    print(f"operator log:  {log_path}")
    print(f"artifacts:     {ARTIFACTS / NAMESPACE}")
    print(
        f"explore:       export KUBECONFIG={cluster.kubeconfig} "
        f"PATH={cluster.bin_dir}:$PATH; kubectl get kubeloop -A"
    )
    print("stop:          make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
