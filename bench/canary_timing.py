"""Canary timing: how long a healthy version takes to be promoted and a broken one to be rolled
back, against the configured analysis interval (the baseline: what the policy itself asks for).

Real everything: the local control plane, the operator, Prometheus (1 s scrapes), model
servers and the traffic splitter; a bounded client sends steady traffic on 127.0.0.1.

    .venv/bin/python bench/canary_timing.py [--interval 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hack import prometheus as prometheus_mod  # noqa: E402
from hack.cluster import cluster as cluster_mod  # noqa: E402

from kubeloop.backends.kube import (  # noqa: E402
    MODEL_DEPLOYMENTS,
    MODEL_VERSIONS,
    NAMESPACES,
    KubeClient,
    connection_info,
)
from kubeloop.serving.samples import (  # noqa: E402
    breast_cancer_rows,
    train_tabular_model,
    write_broken_model,
)

RESULTS = ROOT / "bench" / "results"
STEPS = [20, 50, 100]


def spawn_operator(namespace: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubeloop", "operator", "-n", namespace, "--liveness="],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def traffic(url: str, stop: asyncio.Event, first_error: list[float]) -> None:
    """Steady requests until stopped; records when the first 5xx came back."""
    row = breast_cancer_rows(1)[0]
    body = {"id": "b", "inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": row}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        for _ in range(100_000):
            if stop.is_set():
                return
            try:
                async with client.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status >= 500 and not first_error:
                        first_error.append(time.perf_counter())
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.02)


async def wait_status(
    kube: KubeClient, ns: str, name: str, done: Any, limit_s: float = 300
) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        status = (await kube.get(MODEL_DEPLOYMENTS, ns, name)).get("status") or {}
        if done(status):
            return time.perf_counter() - started
        await asyncio.sleep(0.1)
    raise TimeoutError("rollout did not finish")


async def one_run(kube: KubeClient, ns: str, name: str, interval: float) -> dict[str, float]:
    def point(version: str) -> dict[str, Any]:
        return {"spec": {"model": {"modelVersion": {"name": version}}}}

    await kube.create(
        MODEL_DEPLOYMENTS,
        ns,
        {
            "apiVersion": "kubeloop.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name},
            "spec": {
                "model": {"modelVersion": {"name": "m-v1"}},
                "serving": {"backend": "local"},
                "rollout": {
                    "steps": STEPS,
                    "interval": f"{interval:g}s",
                    "analysis": {
                        "minRequests": 10,
                        "failureLimit": 1,
                        "maxP99LatencyMs": 3000,
                        "maxPredictionShift": 2.0,
                    },
                },
            },
        },
    )
    await wait_status(kube, ns, name, lambda s: s.get("phase") == "Serving" and s.get("url"))
    url = (await kube.get(MODEL_DEPLOYMENTS, ns, name))["status"]["url"]
    stop = asyncio.Event()
    first_error: list[float] = []
    load = asyncio.create_task(traffic(url, stop, first_error))
    try:
        await kube.patch(MODEL_DEPLOYMENTS, ns, name, point("m-v2"))
        promote = await wait_status(
            kube, ns, name, lambda s: s.get("stable", {}).get("modelVersion") == "m-v2"
        )
        await kube.patch(MODEL_DEPLOYMENTS, ns, name, point("m-v3"))
        rollback = await wait_status(kube, ns, name, lambda s: s.get("phase") == "RolledBack")
        rolled_back_at = time.perf_counter()
    finally:
        stop.set()
        await load
        await kube.delete(MODEL_DEPLOYMENTS, ns, name)
    # From the first failed request (the canary loaded and took traffic) to the rollback.
    after_failure = rolled_back_at - first_error[0] if first_error else float("nan")
    return {
        "promote_s": promote,
        "rollback_s": after_failure,
        "rollback_from_spec_change_s": rollback,
    }


async def run(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[dict[str, float]]:
    ns = f"bench-canary-{int(time.time())}"
    async with KubeClient(connection_info(), field_manager="bench") as kube:
        await kube.create(
            NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        )
        models = work / "artifacts" / ns / "m"
        train_tabular_model(models / "v1", seed=1)
        train_tabular_model(models / "v2", seed=2)
        write_broken_model(models / "v3")
        for number in (1, 2, 3):
            await kube.create(
                MODEL_VERSIONS,
                ns,
                {
                    "apiVersion": "kubeloop.dev/v1alpha1",
                    "kind": "ModelVersion",
                    "metadata": {"name": f"m-v{number}"},
                    "spec": {
                        "modelName": "m",
                        "version": number,
                        "artifact": {"uri": f"file://{models / f'v{number}'}"},
                    },
                },
            )
        operator = spawn_operator(ns, env, work / "operator.log")
        try:
            return [
                await one_run(kube, ns, f"bench-{i}", args.interval) for i in range(args.repeats)
            ]
        finally:
            operator.terminate()
            operator.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=5.0, help="analysis interval, s")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeloop-canary-bench-"))
    cluster_state = cluster_mod.CACHE / "cluster-bench"
    cluster_mod.down(cluster_state, purge=True)
    cluster = cluster_mod.up(cluster_state, with_kwok=False)
    prom = prometheus_mod.up(
        work / "prometheus", targets_dir=work / "targets", scrape_interval="1s"
    )
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBELOOP_PROMETHEUS_URL": prom.url,
        "KUBELOOP_SCRAPE_TARGETS_DIR": str(work / "targets"),
        "KUBELOOP_STATE_DIR": str(work / "state"),
        "KUBELOOP_ARTIFACT_ROOT": str(work / "artifacts"),
        "KUBELOOP_METRICS_PORT": "0",
    }
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    cluster_mod.install_crds(cluster, ROOT / "crds")
    try:
        runs = asyncio.run(run(args, work, env))
    finally:
        prometheus_mod.down(work / "prometheus")
        cluster_mod.down(cluster_state, purge=True)
        shutil.rmtree(work, ignore_errors=True)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    minimum = len(STEPS) * args.interval
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "canary_timing.json").write_text(
        json.dumps(
            {"interval_s": args.interval, "steps": STEPS, "runs": runs, "median": median}, indent=2
        )
    )
    print(f"interval {args.interval:g} s, steps {STEPS}, {args.repeats} runs (medians)")
    print(
        f"promote   {median['promote_s']:6.1f} s   baseline {minimum:g} s (steps x interval): "
        f"ratio {median['promote_s'] / minimum:.2f}"
    )
    print(
        f"rollback  {median['rollback_s']:6.1f} s   after its first failed request "
        f"(target ≤ interval + 5 s = {args.interval + 5:g} s); "
        f"{median['rollback_from_spec_change_s']:.1f} s from the spec change incl. model load"
    )
    print(
        "RESULT "
        + " ".join(
            [
                f"interval_s={args.interval:g}",
                f"promote_s={median['promote_s']:.2f}",
                f"promote_vs_steps_x_interval_ratio={median['promote_s'] / minimum:.3f}",
                f"rollback_s={median['rollback_s']:.2f}",
                f"rollback_minus_interval_s={median['rollback_s'] - args.interval:.2f}",
                f"rollback_from_spec_change_s={median['rollback_from_spec_change_s']:.2f}",
            ]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
