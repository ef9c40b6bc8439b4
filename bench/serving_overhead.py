"""Serving overhead: kubeloop's serving runtime against a bare FastAPI endpoint, same model.

Baseline (the limit): a bare FastAPI + uvicorn endpoint (ORJSON responses, uvicorn's default
access log) calling the very same ``LoadedModel.predict``. Measured, in one run, with one
aiohttp client on 127.0.0.1: p50/p99 latency and throughput for sequential requests and for
32 concurrent clients, for (a) the runtime (``python -m kubeloop.serving``, its own app),
(b) the bare endpoint, (c) kserve's ModelServer with the same model (``--server kserve``, the
protocol reference), (d) the runtime's V2 gRPC server (a grpc.aio client), (e) the runtime with
its monitoring on (request log on a temp dir, label feedback) vs off, and the runtime with
dynamic batching on vs off under 32 concurrent clients — for the trained breast-cancer MLP
and for a wide MLP whose compute dominates. Each figure is the median of ``--rounds`` rounds.

    .venv/bin/python bench/serving_overhead.py            # 3-4 minutes on 2 cores
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
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
def server(kind: str, model_dir: Path, *extra: str) -> Iterator[tuple[str, int]]:
    """Start a server process; yield its predict URL (a gRPC target for "grpc") and its pid;
    always stop it. ``kind``: bare, runtime, kserve or grpc (the runtime with its gRPC port)."""
    port = free_port()
    target = ""
    if kind == "grpc":
        grpc_port = free_port()
        extra = (*extra, "--grpc-port", str(grpc_port))
        target = f"127.0.0.1:{grpc_port}"
    if kind == "kserve":
        extra = (*extra, "--server", "kserve")
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
        yield target or url, process.pid
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


async def load_grpc(
    target: str, rows: list[list[float]], *, requests: int, clients: int
) -> dict[str, float]:
    """``requests`` single-row V2 ModelInfer calls (FP32 contents) over ``clients`` loops
    sharing one channel, as a gRPC client would."""
    import grpc  # type: ignore[import-untyped]

    from kubeloop.serving.grpc_server import stubs

    pb = stubs()
    bodies = []
    for row in rows:
        request = pb.ModelInferRequest(model_name=MODEL)
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, len(row)])
        tensor.contents.fp32_contents.extend(row)
        bodies.append(request)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )

        async def one(i: int) -> None:
            start = time.perf_counter()
            await infer(bodies[i % len(bodies)], timeout=30)
            latencies.append(time.perf_counter() - start)

        async def client(first: int) -> None:
            for i in range(first, requests, clients):
                await one(i)

        for i in range(min(50, requests)):
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True)
class Target:
    url: str  # the predict URL, or a gRPC target
    pid: int  # the server process
    grpc: bool = False
    sequential: int = 300  # requests, one client
    concurrent: int = 1600  # requests, 32 clients


def measure(targets: dict[str, Target], rows: list[list[float]], rounds: int) -> dict[str, Any]:
    """Median over rounds of each target's sequential and concurrent figures, and the server's
    CPU time per request under 32 clients (``cpu_us``: less sensitive than wall-clock figures
    to other load on a shared machine). Rounds are interleaved (each round visits every target
    in turn) so that load from outside the benchmark falls on all of them alike."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {"sequential": [], "concurrent": []} for name in targets
    }
    for _ in range(rounds):
        for name, t in targets.items():
            run = load_grpc if t.grpc else load
            runs[name]["sequential"].append(
                asyncio.run(run(t.url, rows, requests=t.sequential, clients=1))
            )
            before = cpu_seconds(t.pid)
            figure = asyncio.run(run(t.url, rows, requests=t.concurrent, clients=CONCURRENCY))
            # the warm-up requests ran on the server's clock too
            warm_up = min(50, t.concurrent)
            figure["cpu_us"] = (cpu_seconds(t.pid) - before) / (t.concurrent + warm_up) * 1e6
            runs[name]["concurrent"].append(figure)
    return {
        name: {
            mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for mode, results in modes.items()
        }
        for name, modes in runs.items()
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wide-hidden", type=int, default=1024, help="0 skips the wide model")
    parser.add_argument(
        "--wide-requests",
        type=int,
        default=400,
        help="requests at 32 clients for the wide model (one client: a quarter of that)",
    )
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare[0], int(args.serve_bare[1]))
        return 0

    rows = breast_cancer_rows(256)
    batching = ("--max-batch-size", str(CONCURRENCY), "--max-latency-ms", "2")
    with tempfile.TemporaryDirectory(prefix="kubeloop-bench-") as tmp:
        tabular = train_tabular_model(Path(tmp) / "tabular")
        # Monitoring on: the request log on a temp dir and label feedback; off: no request
        # log (the feedback store cannot be turned off: recording.attach always adds it).
        monitoring_on = (
            "--request-log-uri", str(Path(tmp) / "request-log"), "--feedback-ttl", "3600",
        )  # fmt: skip
        monitoring_off = ("--feedback-ttl", "3600")
        counts = (args.sequential, args.concurrent)
        configs: list[tuple[str, str, Path, tuple[str, ...], tuple[int, int]]] = [
            ("bare", "bare", tabular, (), counts),
            ("runtime", "runtime", tabular, (), counts),
            ("kserve", "kserve", tabular, (), counts),
            ("grpc", "grpc", tabular, (), counts),
            ("runtime_monitoring_off", "runtime", tabular, monitoring_off, counts),
            ("runtime_monitoring_on", "runtime", tabular, monitoring_on, counts),
            ("runtime_batching", "runtime", tabular, batching, counts),
        ]
        if args.wide_hidden:
            wide = wide_model(Path(tmp) / "wide", args.wide_hidden)
            # Unbatched, the wide model answers some 50-200 requests a second: fewer requests.
            few = (max(args.wide_requests // 4, 1), args.wide_requests)
            configs += [
                ("wide_runtime", "runtime", wide, (), few),
                ("wide_runtime_batching", "runtime", wide, batching, few),
            ]
        with ExitStack() as stack:  # every server up at once (idle ones cost no CPU)
            targets = {}
            for name, kind, model_dir, extra, (sequential, concurrent) in configs:
                url, pid = stack.enter_context(server(kind, model_dir, *extra))
                targets[name] = Target(url, pid, kind == "grpc", sequential, concurrent)
            figures = measure(targets, rows, args.rounds)
        for name, figure in figures.items():
            print(name, json.dumps(figure), flush=True)

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
        "latency_p50_ms_kserve": figures["kserve"][seq]["p50_ms"],
        "throughput_rps_c32_kserve": figures["kserve"][conc]["throughput_rps"],
        "latency_p50_ms_grpc": figures["grpc"][seq]["p50_ms"],
        "throughput_rps_c32_grpc": figures["grpc"][conc]["throughput_rps"],
        "throughput_rps_c32_monitoring_off": figures["runtime_monitoring_off"][conc][
            "throughput_rps"
        ],
        "throughput_rps_c32_monitoring_on": figures["runtime_monitoring_on"][conc][
            "throughput_rps"
        ],
        # server CPU per request at 32 clients: what a shared machine can still compare
        "cpu_us_per_request_bare": figures["bare"][conc]["cpu_us"],
        "cpu_us_per_request_runtime": figures["runtime"][conc]["cpu_us"],
        "cpu_us_per_request_kserve": figures["kserve"][conc]["cpu_us"],
        "cpu_us_per_request_grpc": figures["grpc"][conc]["cpu_us"],
        "cpu_us_per_request_monitoring_off": figures["runtime_monitoring_off"][conc]["cpu_us"],
        "cpu_us_per_request_monitoring_on": figures["runtime_monitoring_on"][conc]["cpu_us"],
    }
    result["ratio_latency_p50_runtime_over_bare"] = (
        result["latency_p50_ms_runtime"] / result["latency_p50_ms_bare"]
    )
    result["ratio_throughput_c32_runtime_over_bare"] = (
        result["throughput_rps_c32_runtime"] / result["throughput_rps_c32_bare"]
    )
    result["ratio_cpu_per_request_runtime_over_bare"] = (
        result["cpu_us_per_request_runtime"] / result["cpu_us_per_request_bare"]
    )
    result["ratio_cpu_per_request_monitoring_on_over_off"] = (
        result["cpu_us_per_request_monitoring_on"] / result["cpu_us_per_request_monitoring_off"]
    )
    result["ratio_throughput_c32_runtime_over_kserve"] = (
        result["throughput_rps_c32_runtime"] / result["throughput_rps_c32_kserve"]
    )
    result["ratio_throughput_c32_monitoring_on_over_off"] = (
        result["throughput_rps_c32_monitoring_on"] / result["throughput_rps_c32_monitoring_off"]
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
    goals = {
        "latency ratio <= 1.05": result["ratio_latency_p50_runtime_over_bare"] <= 1.05,
        "throughput ratio >= 1.0": result["ratio_throughput_c32_runtime_over_bare"] >= 1.0,
        "batching >= 1.0x at 32 clients (sample MLP)": result[
            "ratio_throughput_c32_batching_on_over_off"
        ]
        >= 1.0,
        "monitoring on/off >= 0.9 at 32 clients": result[
            "ratio_throughput_c32_monitoring_on_over_off"
        ]
        >= 0.9,
    }
    if "ratio_throughput_c32_wide_batching_on_over_off" in result:
        goals["batching >= 3x at 32 clients (wide MLP)"] = (
            result["ratio_throughput_c32_wide_batching_on_over_off"] >= 3
        )
    for target, met in goals.items():
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
                    "wide_requests": args.wide_requests,
                },
                "figures": figures,
                "result": result,
                "targets_met": goals,
            },
            indent=2,
        )
        + "\n"
    )
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
