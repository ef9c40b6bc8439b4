"""Reconcile throughput: 1,000 ModelVersions created against the real API server.

Baselines, measured in the same run, same client, same concurrency, nobody watching:
- raw create: the API server's create rate for the same objects;
- create + status (the physical floor of a correct reconcile): a bare client that creates each
  object and writes its status once.
Measured: operator-inclusive throughput (first create → last Ready) and its ratio to both,
create→Ready latency p50/p99, the writes the operator made per object (the API server's own
request counter: every POST/PUT/PATCH/DELETE during the run, less the bench's creates), and
the operator's peak RSS.

    make bench            # or: .venv/bin/python bench/reconcile_throughput.py --count 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from kubeloop.backends.kube import MODEL_VERSIONS, NAMESPACES, KubeClient, connection_info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hack.cluster import cluster as cluster_mod  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STATE = cluster_mod.CACHE / "cluster-bench"
BASE_COUNT = 1000  # the size the targets are set at


def manifest(i: int) -> dict[str, Any]:
    model, number = f"m{i // 10:04d}", i % 10 + 1
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": f"{model}-v{number}"},
        "spec": {
            "modelName": model,
            "version": number,
            "artifact": {"uri": f"s3://bench/{model}/{number}"},
            "metrics": {"f1": 0.9},
        },
    }


async def create_all(
    kube: KubeClient, namespace: str, count: int, concurrency: int
) -> dict[str, float]:
    """Create ``count`` objects with ``concurrency`` in flight; return name → created time."""
    created: dict[str, float] = {}
    queue = list(range(count))

    async def worker() -> None:
        while queue:
            doc = manifest(queue.pop())
            await kube.create(MODEL_VERSIONS, namespace, doc)
            created[doc["metadata"]["name"]] = time.perf_counter()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return created


async def create_with_status(
    kube: KubeClient, namespace: str, count: int, concurrency: int
) -> None:
    """The floor: create each object, then write its status once (what a reconcile that
    writes nothing else costs the API server)."""
    queue = list(range(count))
    status = {
        "status": {
            "phase": "Ready",
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Registered",
                    "message": "bench",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                    "observedGeneration": 1,
                }
            ],
        }
    }

    async def worker() -> None:
        while queue:
            doc = manifest(queue.pop())
            await kube.create(MODEL_VERSIONS, namespace, doc)
            name = doc["metadata"]["name"]
            await kube.patch(MODEL_VERSIONS, namespace, name, status, subresource="status")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE"}


def api_writes(kubectl: Path) -> float:
    """Write requests the API server has answered so far (its apiserver_request_total)."""
    text = subprocess.run(
        [str(kubectl), "get", "--raw", "/metrics"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels, value = line.rsplit(" ", 1)
            verb = re.search(r'verb="([A-Z]+)"', labels)
            if verb and verb.group(1) in WRITE_VERBS:
                total += float(value)
    return total


def spawn_operator(namespace: str) -> subprocess.Popen[bytes]:
    with (RESULTS / "operator.log.tmp").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kubeloop", "operator", "-n", namespace, "--liveness="],
            env={**os.environ, "KUBELOOP_METRICS_PORT": "0"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def server_cpu_seconds() -> float:
    """CPU time used so far by kube-apiserver and etcd (where the operator's calls cost)."""
    total = 0.0
    for name in ("kube-apiserver", "etcd"):
        pid = int((STATE / f"{name}.pid").read_text())
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def fresh_namespace(kube: KubeClient, name: str) -> None:
    await kube.create(
        NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )


async def warm_up(count: int, concurrency: int) -> None:
    """A fresh API server (and controller-manager still syncing) creates slower at first:
    warm it up once so the first run's baseline is not understated."""
    async with KubeClient(connection_info(), field_manager="bench") as kube:
        await fresh_namespace(kube, "bench-warm-up")
        await create_all(kube, "bench-warm-up", count, concurrency)


async def baselines(
    kube: KubeClient, suffix: str, count: int, concurrency: int
) -> tuple[float, float]:
    """Objects per second: raw creates, and creates each followed by one status write."""
    # Baseline: raw create rate, nobody watching.
    raw_ns = f"bench-raw-{suffix}"
    await fresh_namespace(kube, raw_ns)
    started = time.perf_counter()
    await create_all(kube, raw_ns, count, concurrency)
    raw_rate = count / (time.perf_counter() - started)

    # Baseline: the floor of a correct reconcile, create + one status write, nobody watching.
    floor_ns = f"bench-floor-{suffix}"
    await fresh_namespace(kube, floor_ns)
    started = time.perf_counter()
    await create_with_status(kube, floor_ns, count, concurrency)
    floor_rate = count / (time.perf_counter() - started)

    return raw_rate, floor_rate


async def run(count: int, concurrency: int, kubectl: Path) -> dict[str, float]:
    kube = KubeClient(connection_info(), field_manager="bench")
    suffix = str(int(time.time()))

    raw_rate, floor_rate = await baselines(kube, suffix, count, concurrency)

    # With the operator: create the same objects, wait for every one to be Ready.
    op_ns = f"bench-op-{suffix}"
    await fresh_namespace(kube, op_ns)
    proc = spawn_operator(op_ns)
    process = psutil.Process(proc.pid)
    peak_rss = 0.0
    ready_at: dict[str, float] = {}

    async def watch_ready() -> None:
        while len(ready_at) < count:
            async for _, obj in kube.watch(MODEL_VERSIONS, op_ns, timeout_seconds=120):
                conds = (obj.get("status") or {}).get("conditions", [])
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                    ready_at.setdefault(obj["metadata"]["name"], time.perf_counter())
                if len(ready_at) >= count:
                    return

    async def sample_rss() -> None:
        nonlocal peak_rss
        while len(ready_at) < count:
            peak_rss = max(peak_rss, process.memory_info().rss / 2**20)
            await asyncio.sleep(0.1)

    try:
        await asyncio.sleep(3)  # operator start-up (import, login, watch) is not measured
        watcher = asyncio.create_task(watch_ready())
        sampler = asyncio.create_task(sample_rss())
        servers_before = server_cpu_seconds()
        writes_before = api_writes(kubectl)
        started = time.perf_counter()
        created = await create_all(kube, op_ns, count, concurrency)
        await asyncio.wait_for(watcher, timeout=600)
        await sampler
        cpu = process.cpu_times()
        operator_cpu = cpu.user + cpu.system
        servers = server_cpu_seconds() - servers_before
        await asyncio.sleep(2)  # writes still in flight (Events are posted in the background)
        writes = api_writes(kubectl) - writes_before - count  # less the bench's own creates
    finally:
        proc.terminate()
        proc.wait(30)
        await kube.close()
    op_rate = count / (max(ready_at.values()) - started)
    latencies = sorted(ready_at[n] - created[n] for n in created)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return {
        "objects": count,
        "concurrency": concurrency,
        "raw_create_per_s": raw_rate,
        "create_plus_status_per_s": floor_rate,
        "operator_ready_per_s": op_rate,
        "ratio_vs_raw_create": op_rate / raw_rate,
        "ratio_vs_create_plus_status": op_rate / floor_rate,
        "writes_per_object": writes / count,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": p99,
        "operator_peak_rss_mb": peak_rss,
        "operator_cpu_s": operator_cpu,
        "apiserver_etcd_cpu_s": servers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", "--count", dest="count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians are reported")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    cluster_mod.down(STATE, purge=True)
    cluster = cluster_mod.up(STATE, with_kwok=False)
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    cluster_mod.install_crds(cluster, ROOT / "crds")
    # A scale run (more than 1,000 objects) measures 1,000 first, on the same server, so that
    # the growth of latency and memory is read from one run.
    scale = args.count > BASE_COUNT
    try:
        asyncio.run(warm_up(min(args.count, BASE_COUNT), args.concurrency))
        kubectl = cluster.bin_dir / "kubectl"
        base = (
            [asyncio.run(run(BASE_COUNT, args.concurrency, kubectl)) for _ in range(args.repeats)]
            if scale
            else []
        )
        runs = [
            asyncio.run(run(args.count, args.concurrency, kubectl)) for _ in range(args.repeats)
        ]
    finally:
        cluster_mod.down(STATE, purge=True)
    keys = runs[0].keys()
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    name = "reconcile_throughput" + (f"-{args.count}" if args.count != BASE_COUNT else "")
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"runs": runs, "median": median, "base_runs": base}, indent=2)
    )
    growth: dict[str, float] = {}
    if scale:
        at_base = {k: statistics.median(r[k] for r in base) for k in keys}
        growth = {
            "latency_p50_growth": median["latency_p50_s"] / at_base["latency_p50_s"],
            "latency_p99_growth": median["latency_p99_s"] / at_base["latency_p99_s"],
            "rss_growth": median["operator_peak_rss_mb"] / at_base["operator_peak_rss_mb"],
            "rss_kb_per_extra_object": (
                (median["operator_peak_rss_mb"] - at_base["operator_peak_rss_mb"])
                * 1024
                / (args.count - BASE_COUNT)
            ),
            "throughput_growth": median["operator_ready_per_s"] / at_base["operator_ready_per_s"],
        }
        print(
            f"from {BASE_COUNT} to {args.count} objects (same server, this run): latency p50 "
            f"x{growth['latency_p50_growth']:.2f}, p99 x{growth['latency_p99_growth']:.2f}, "
            f"peak RSS {at_base['operator_peak_rss_mb']:.0f} → "
            f"{median['operator_peak_rss_mb']:.0f} MB "
            f"({growth['rss_kb_per_extra_object']:.1f} kB per extra object), throughput "
            f"x{growth['throughput_growth']:.2f}"
        )
    print(f"objects={args.count} concurrency={args.concurrency} repeats={args.repeats}")
    print(f"baseline raw API create rate   {median['raw_create_per_s']:8.1f} obj/s")
    print(f"baseline create + status write {median['create_plus_status_per_s']:8.1f} obj/s")
    print(
        f"operator create→Ready rate     {median['operator_ready_per_s']:8.1f} obj/s"
        f"   ratio {median['ratio_vs_create_plus_status']:.2f} vs create+status (target ≥ 0.8),"
        f" {median['ratio_vs_raw_create']:.2f} vs raw create (target ≥ 0.4)"
    )
    print(f"operator writes per object     {median['writes_per_object']:8.2f} (target ≤ 1.1)")
    print(
        f"create→Ready latency p50/p99   {median['latency_p50_s'] * 1000:6.0f} / "
        f"{median['latency_p99_s'] * 1000:.0f} ms (target p99 ≤ 1000 ms)"
    )
    print(
        f"CPU during the run: operator {median['operator_cpu_s']:.1f} s, "
        f"kube-apiserver+etcd {median['apiserver_etcd_cpu_s']:.1f} s (2 cores shared)"
    )
    print(
        f"operator peak RSS              {median['operator_peak_rss_mb']:8.1f} MB (target ≤ 120 MB)"
    )
    print(
        "RESULT "
        + " ".join(
            f"{k}={median[k]:.4g}"
            for k in (
                "raw_create_per_s",
                "create_plus_status_per_s",
                "operator_ready_per_s",
                "ratio_vs_create_plus_status",
                "ratio_vs_raw_create",
                "writes_per_object",
                "latency_p50_s",
                "latency_p99_s",
                "operator_peak_rss_mb",
            )
        )
        + "".join(f" {k}={v:.4g}" for k, v in growth.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
