"""Serving overhead: kubeloop's kserve runtime against a bare FastAPI endpoint, same model.

Baseline (the limit): a bare FastAPI + uvicorn endpoint (ORJSON responses, uvicorn's default
access log) calling the very same ``LoadedModel.predict``. Measured, in one run, with one
aiohttp client on 127.0.0.1: p50/p99 latency and throughput for sequential requests and for
32 concurrent clients, for (a) the runtime, (b) the bare endpoint, and the runtime with dynamic
batching on vs off under 32 concurrent clients — for the trained breast-cancer MLP and for a
wide MLP whose compute dominates. Each figure is the median of ``--rounds`` rounds.

    .venv/bin/python bench/serving_overhead.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from fastapi import Request  # module level: FastAPI resolves the handler's annotation here

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kubeloop.contract.reference import reference_from_data  # noqa: E402
from kubeloop.serving.artifact import load_model, save_model  # noqa: E402
from kubeloop.serving.samples import (  # noqa: E402
    CLASSES,
    breast_cancer,
    breast_cancer_rows,
    train_tabular_model,
)

RESULTS = ROOT / "bench" / "results"
MODEL = "bench"
CONCURRENCY = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_bare(model_dir: str, port: int) -> None:
    """The baseline server (run in its own process by ``--serve-bare``)."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import ORJSONResponse

    model = load_model(model_dir)
    app = FastAPI(default_response_class=ORJSONResponse)

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        body = await request.json()
        outputs = model.predict(np.asarray(body["instances"], dtype=np.float32))
        return {"predictions": outputs.tolist()}

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    # uvicorn defaults (info level, access log on), like the runtime; both write to DEVNULL.
    uvicorn.run(app, host="127.0.0.1", port=port)


@contextmanager
def server(kind: str, model_dir: Path, *extra: str) -> Iterator[str]:
    """Start a server process; yield its predict URL; always stop it."""
    port = free_port()
    if kind == "bare":
        command = [sys.executable, __file__, "--serve-bare", str(model_dir), str(port)]
        url, ready = f"http://127.0.0.1:{port}/predict", f"http://127.0.0.1:{port}/ready"
    else:
        command = [
            sys.executable, "-m", "kubeloop.serving", "--model-dir", str(model_dir),
            "--model-name", MODEL, "--model-version", "bench-v1", "--http-port", str(port), *extra,
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/models/{MODEL}:predict"
        ready = f"http://127.0.0.1:{port}/v2/health/ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{kind} server exited with {process.returncode}")
            try:
                with urllib.request.urlopen(ready, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server not ready in 90 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def load(
    url: str, rows: list[list[float]], *, requests: int, clients: int
) -> dict[str, float]:
    """``requests`` single-row predictions spread over ``clients`` concurrent loops."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            body = json.dumps({"instances": [rows[i % len(rows)]]})
            start = time.perf_counter()
            async with session.post(
                url, data=body, headers={"content-type": "application/json"}
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}")
            latencies.append(time.perf_counter() - start)

        async def client(first: int) -> None:
            for i in range(first, requests, clients):
                await one(i)

        for i in range(min(50, requests)):  # warm-up: connections, first-call paths
            await one(i)
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "throughput_rps": requests / elapsed,
    }


def measure(url: str, rows: list[list[float]], args: argparse.Namespace) -> dict[str, Any]:
    """Median over rounds of the sequential and the concurrent figures."""
    runs: dict[str, list[dict[str, float]]] = {"sequential": [], "concurrent": []}
    for _ in range(args.rounds):
        runs["sequential"].append(asyncio.run(load(url, rows, requests=args.sequential, clients=1)))
        runs["concurrent"].append(
            asyncio.run(load(url, rows, requests=args.concurrent, clients=CONCURRENCY))
        )
    return {
        mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for mode, results in runs.items()
    }


def wide_model(directory: Path, hidden: int) -> Path:
    """An untrained wide MLP on the same features: compute dominates, so batching can pay."""
    import torch

    torch.manual_seed(0)
    x, _, names = breast_cancer()
    layers: list[torch.nn.Module] = [torch.nn.Linear(30, hidden), torch.nn.ReLU()]
    for _ in range(2):
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    module = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 2))
    return save_model(
        directory, module, task="classification", features=names, classes=CLASSES,
        mean=x.mean(axis=0).tolist(), scale=x.std(axis=0).tolist(),
        reference=reference_from_data(x, names, np.full(len(x), 0.5), task="classification"),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve-bare", nargs=2, metavar=("MODEL_DIR", "PORT"))
    parser.add_argument("--sequential", type=int, default=300, help="requests, one client")
    parser.add_argument("--concurrent", type=int, default=1600, help="requests, 32 clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wide-hidden", type=int, default=1024, help="0 skips the wide model")
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare[0], int(args.serve_bare[1]))
        return 0

    rows = breast_cancer_rows(256)
    figures: dict[str, Any] = {}
    batching = ("--max-batch-size", str(CONCURRENCY), "--max-latency-ms", "2")
    with tempfile.TemporaryDirectory(prefix="kubeloop-bench-") as tmp:
        tabular = train_tabular_model(Path(tmp) / "tabular")
        for name, kind, extra in (
            ("bare", "bare", ()),
            ("runtime", "runtime", ()),
            ("runtime_batching", "runtime", batching),
        ):
            with server(kind, tabular, *extra) as url:
                figures[name] = measure(url, rows, args)
            print(name, json.dumps(figures[name]), flush=True)
        if args.wide_hidden:
            wide = wide_model(Path(tmp) / "wide", args.wide_hidden)
            for name, extra in (("wide_runtime", ()), ("wide_runtime_batching", batching)):
                with server("runtime", wide, *extra) as url:
                    figures[name] = measure(url, rows, args)
                print(name, json.dumps(figures[name]), flush=True)

    seq, conc = "sequential", "concurrent"
    result: dict[str, float] = {
        "latency_p50_ms_bare": figures["bare"][seq]["p50_ms"],
        "latency_p50_ms_runtime": figures["runtime"][seq]["p50_ms"],
        "latency_p99_ms_bare": figures["bare"][seq]["p99_ms"],
        "latency_p99_ms_runtime": figures["runtime"][seq]["p99_ms"],
        "throughput_rps_seq_bare": figures["bare"][seq]["throughput_rps"],
        "throughput_rps_seq_runtime": figures["runtime"][seq]["throughput_rps"],
        "throughput_rps_c32_bare": figures["bare"][conc]["throughput_rps"],
        "throughput_rps_c32_runtime": figures["runtime"][conc]["throughput_rps"],
        "throughput_rps_c32_runtime_batching": figures["runtime_batching"][conc]["throughput_rps"],
        "latency_p99_ms_c32_runtime": figures["runtime"][conc]["p99_ms"],
        "latency_p99_ms_c32_runtime_batching": figures["runtime_batching"][conc]["p99_ms"],
    }
    result["ratio_latency_p50_runtime_over_bare"] = (
        result["latency_p50_ms_runtime"] / result["latency_p50_ms_bare"]
    )
    result["ratio_throughput_c32_runtime_over_bare"] = (
        result["throughput_rps_c32_runtime"] / result["throughput_rps_c32_bare"]
    )
    result["ratio_throughput_c32_batching_on_over_off"] = (
        result["throughput_rps_c32_runtime_batching"] / result["throughput_rps_c32_runtime"]
    )
    if "wide_runtime" in figures:
        on = figures["wide_runtime_batching"][conc]["throughput_rps"]
        off = figures["wide_runtime"][conc]["throughput_rps"]
        result["throughput_rps_c32_wide_runtime"] = off
        result["throughput_rps_c32_wide_runtime_batching"] = on
        result["ratio_throughput_c32_wide_batching_on_over_off"] = on / off
    targets = {
        "latency ratio <= 1.2": result["ratio_latency_p50_runtime_over_bare"] <= 1.2,
        "throughput ratio >= 0.8": result["ratio_throughput_c32_runtime_over_bare"] >= 0.8,
        "batching >= 3x at 32 clients": result["ratio_throughput_c32_batching_on_over_off"] >= 3,
    }
    for target, met in targets.items():
        print(f"target {target}: {'met' if met else 'NOT met'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving_overhead.json").write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "settings": {
                    "sequential_requests": args.sequential,
                    "concurrent_requests": args.concurrent,
                    "concurrency": CONCURRENCY,
                    "rounds": args.rounds,
                    "batching": list(batching),
                    "wide_hidden": args.wide_hidden,
                },
                "figures": figures,
                "result": result,
                "targets_met": targets,
            },
            indent=2,
        )
        + "\n"
    )
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
