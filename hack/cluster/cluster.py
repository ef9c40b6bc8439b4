#!/usr/bin/env python3
"""Start and stop kubeloop's local control plane: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler (and kwok for fake GPU nodes), all on 127.0.0.1.

    cluster.py up     # idempotent: reuses a healthy cluster in the same state directory
    cluster.py down
    cluster.py status

Each process is started detached (its own session) with a pid file and a log under the
state directory, so the cluster outlives the shell that started it and ``down`` finds it.
The binaries come from ``build.sh`` (cached by version).  Standard library only: the
pytest fixture imports this file directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(
    os.environ.get(
        "KUBELOOP_CACHE",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubeloop",
    )
)
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.35.4")
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


@dataclass(frozen=True)
class Cluster:
    state_dir: Path
    api_port: int

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def bin_dir(self) -> Path:
        return CACHE / f"k8s-{K8S_VERSION}" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def ensure_binaries() -> Path:
    bin_dir = CACHE / f"k8s-{K8S_VERSION}" / "bin"
    if not (bin_dir / "kube").exists() or not (bin_dir / "etcd").exists():
        subprocess.run([str(HERE / "build.sh")], check=True)
    return bin_dir


def _make_pki(pki: Path) -> None:
    """A CA, the apiserver's serving cert, an admin client cert and the SA signing key."""
    if (pki / "admin.crt").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    ossl = "openssl"
    _run(
        ossl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=kubeloop-local-ca",
        cwd=pki,
    )
    (pki / "san.cnf").write_text(
        "[ext]\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
    )
    for name, subj, ext in (
        ("apiserver", "/CN=kube-apiserver", ["-extfile", "san.cnf", "-extensions", "ext"]),
        ("admin", "/O=system:masters/CN=kubeloop-admin", []),
    ):
        _run(
            ossl,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subj,
            cwd=pki,
        )
        _run(
            ossl,
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            f"{name}.crt",
            *ext,
            cwd=pki,
        )
    _run(ossl, "genrsa", "-out", "sa.key", "2048", cwd=pki)
    _run(ossl, "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _write_kubeconfig(cluster: Cluster) -> None:
    pki = cluster.state_dir / "pki"
    cluster.kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kubeloop-local",
                "clusters": [
                    {
                        "name": "kubeloop-local",
                        "cluster": {
                            "server": cluster.server,
                            "certificate-authority": str(pki / "ca.crt"),
                        },
                    }
                ],
                "users": [
                    {
                        "name": "admin",
                        "user": {
                            "client-certificate": str(pki / "admin.crt"),
                            "client-key": str(pki / "admin.key"),
                        },
                    }
                ],
                "contexts": [
                    {
                        "name": "kubeloop-local",
                        "context": {
                            "cluster": "kubeloop-local",
                            "user": "admin",
                            "namespace": "default",
                        },
                    }
                ],
            },
            indent=2,
        )
    )


def _pid_alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return True


def _start(cluster: Cluster, name: str, argv: list[str]) -> None:
    pid_file = cluster.state_dir / f"{name}.pid"
    if _pid_alive(pid_file):
        return
    log = open(cluster.state_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    pid_file.write_text(str(proc.pid))


def _ssl_context(cluster: Cluster) -> ssl.SSLContext:
    pki = cluster.state_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def healthy(cluster: Cluster, path: str = "/readyz") -> bool:
    try:
        with urllib.request.urlopen(
            cluster.server + path, context=_ssl_context(cluster), timeout=2
        ) as resp:
            return bool(resp.status == 200)
    except (OSError, ssl.SSLError):
        return False


def _wait(what: str, check: object, timeout: float, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    logs = "\n".join(
        f"--- {n}.log ---\n" + (cluster.state_dir / f"{n}.log").read_text()[-3000:]
        for n in COMPONENTS
        if (cluster.state_dir / f"{n}.log").exists()
    )
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s\n{logs}")


def _ports(state_dir: Path) -> dict[str, int]:
    path = state_dir / "ports.json"
    if path.exists():
        ports: dict[str, int] = json.loads(path.read_text())
        return ports
    ports = {
        name: _free_port() for name in ("api", "etcd", "etcd_peer", "kcm", "scheduler", "kwok")
    }
    if os.environ.get("KUBELOOP_API_PORT"):
        ports["api"] = int(os.environ["KUBELOOP_API_PORT"])
    path.write_text(json.dumps(ports))
    return ports


def up(state_dir: Path, *, with_kwok: bool = True, timeout: float = 120) -> Cluster:
    """Start (or reuse) the control plane in ``state_dir``; return once /readyz is ok."""
    state_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = ensure_binaries()
    ports = _ports(state_dir)
    cluster = Cluster(state_dir, ports["api"])
    pki = state_dir / "pki"
    _make_pki(pki)
    _write_kubeconfig(cluster)

    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd_peer']}"
    _start(
        cluster,
        "etcd",
        [
            str(bin_dir / "etcd"),
            "--name=kubeloop",
            f"--data-dir={state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kubeloop={peer_url}",
            "--log-level=warn",
            # A throw-away development cluster: trade durability for speed.
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=4294967296",
        ],
    )
    _start(
        cluster,
        "kube-apiserver",
        [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['api']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--cert-dir={pki}",
            "--v=0",
        ],
    )
    _wait("kube-apiserver", lambda: healthy(cluster), timeout, cluster)

    common = [
        f"--kubeconfig={cluster.kubeconfig}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--v=0",
    ]
    _start(
        cluster,
        "kube-controller-manager",
        [
            str(bin_dir / "kube-controller-manager"),
            *common,
            f"--secure-port={ports['kcm']}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route",
            "--concurrent-gc-syncs=20",
        ],
    )
    _start(
        cluster,
        "kube-scheduler",
        [
            str(bin_dir / "kube-scheduler"),
            *common,
            f"--secure-port={ports['scheduler']}",
        ],
    )
    kwok = bin_dir / "kwok"
    if with_kwok and kwok.exists():
        _start(
            cluster,
            "kwok",
            [
                str(kwok),
                f"--kubeconfig={cluster.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--disregard-status-with-annotation-selector=kwok.x-k8s.io/status=custom",
                f"--server-address=127.0.0.1:{ports['kwok']}",
            ],
        )
        ensure_fake_gpu_node(cluster)
    return cluster


GPU_NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "kwok-gpu-0",
        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        "labels": {
            "kubernetes.io/hostname": "kwok-gpu-0",
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
        },
    },
    "status": {
        "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"},
        "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"},
    },
}


def ensure_fake_gpu_node(cluster: Cluster) -> None:
    """A kwok-managed node with 8 nvidia.com/gpu, so the real scheduler binds GPU pods."""
    request = urllib.request.Request(
        cluster.server + "/api/v1/nodes",
        data=json.dumps(GPU_NODE).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, context=_ssl_context(cluster), timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # already there
            raise


def install_crds(cluster: Cluster, crds_dir: Path) -> None:
    """Server-side apply the CRDs in ``crds_dir`` and wait until they are served."""
    kubectl = [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}"]
    subprocess.run(
        [*kubectl, "apply", "--server-side", "-f", str(crds_dir)], check=True, capture_output=True
    )
    subprocess.run(
        [*kubectl, "wait", "--for=condition=Established", "crd", "--all"],
        check=True,
        capture_output=True,
    )


def stop_process_group(pid: int, *, grace_s: float) -> None:
    """SIGTERM the process group of ``pid``; SIGKILL it if it still runs after ``grace_s``."""

    def gone_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    for sig, seconds in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        if sig == signal.SIGTERM and grace_s <= 0:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        if gone_within(seconds):
            return


def down(state_dir: Path, *, purge: bool = False) -> None:
    """Stop every component; with ``purge`` also delete etcd's data and the pki."""
    for name in reversed(COMPONENTS):
        pid_file = state_dir / f"{name}.pid"
        if not _pid_alive(pid_file):
            pid_file.unlink(missing_ok=True)
            continue
        # Graceful for 3 s, then killed: this is a throw-away cluster.
        stop_process_group(int(pid_file.read_text()), grace_s=0 if purge else 3)
        pid_file.unlink(missing_ok=True)
    if purge:
        subprocess.run(["rm", "-rf", str(state_dir)], check=True)


def stop_component(state_dir: Path, name: str, *, grace_s: float = 0.0) -> None:
    """Stop one component of the control plane (SIGKILL unless ``grace_s`` > 0: SIGTERM first);
    its data stays. ``up(state_dir)`` starts it again with the same flags, ports and data, and
    leaves the running ones alone (the chaos suite restarts the API server and etcd so)."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}: one of {', '.join(COMPONENTS)}")
    pid_file = state_dir / f"{name}.pid"
    if _pid_alive(pid_file):
        stop_process_group(int(pid_file.read_text()), grace_s=grace_s)
    pid_file.unlink(missing_ok=True)


def restart_component(
    state_dir: Path, name: str, *, down_s: float = 0.0, grace_s: float = 0.0, timeout: float = 120
) -> Cluster:
    """Stop one component, wait ``down_s``, and bring the control plane back (``up``)."""
    stop_component(state_dir, name, grace_s=grace_s)
    time.sleep(down_s)
    return up(state_dir, timeout=timeout)


def default_state_dir() -> Path:
    return Path(os.environ.get("KUBELOOP_CLUSTER_DIR", CACHE / "cluster"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status", "purge"))
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    args = parser.parse_args()
    if args.command == "up":
        started = time.monotonic()
        cluster = up(args.state_dir)
        print(f"control plane ready at {cluster.server} in {time.monotonic() - started:.1f}s")
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"export PATH={cluster.bin_dir}:$PATH")
    elif args.command in ("down", "purge"):
        down(args.state_dir, purge=args.command == "purge")
        print("control plane stopped")
    else:
        ports = _ports(args.state_dir)
        ok = healthy(Cluster(args.state_dir, ports["api"]))
        print("healthy" if ok else "down")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
