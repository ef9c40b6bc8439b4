"""The real serving runtime: `python -m kubeloop.serving` as a subprocess on 127.0.0.1, a real
trained torch model, real HTTP (V1, V2, readiness, /metrics). No Kubernetes cluster needed."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubeloop.serving.artifact import load_model
from kubeloop.serving.samples import breast_cancer_rows, train_tabular_model, write_broken_model
from tests.conftest import ROOT

MODEL, VERSION = "cancer", "cancer-v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    text = raw.decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def start_server(model_dir: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "kubeloop.serving", "--model-dir", str(model_dir),
        "--model-name", MODEL, "--model-version", VERSION, "--http-port", str(port), *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if http("GET", f"{server.url}/v2/health/ready")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise AssertionError(f"server not ready in 90 s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tabular_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(model_dir, tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv
    finally:
        stop_server(srv)


def metric_samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = http("GET", f"{url}/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get(
        (name, frozenset({"model": MODEL, "version": VERSION, **labels}.items())), 0.0
    )


def test_v1_and_v2_predictions_match_the_artifact(server: Server, model_dir: Path) -> None:
    rows = breast_cancer_rows(5, offset=100)
    expected = load_model(model_dir).predict(np.asarray(rows, dtype=np.float32))

    assert http("GET", f"{server.url}/v2/models/{MODEL}/ready")[0] == 200
    status, v1 = http("POST", f"{server.url}/v1/models/{MODEL}:predict", {"instances": rows})
    assert status == 200, v1
    np.testing.assert_allclose(v1["predictions"], expected, rtol=1e-5, atol=1e-6)

    # V2 without an id (kserve 0.21 would answer 500 if the runtime did not supply one)
    body = {"inputs": [{"name": "x", "shape": [5, 30], "datatype": "FP32", "data": rows}]}
    status, v2 = http("POST", f"{server.url}/v2/models/{MODEL}/infer", body)
    assert status == 200, v2
    assert v2["id"]
    assert v2["model_version"] == VERSION
    [output] = v2["outputs"]
    assert output["shape"] == [5, 2]
    assert output["datatype"] == "FP32"
    got = np.asarray(output["data"]).reshape(5, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    status, v2 = http("POST", f"{server.url}/v2/models/{MODEL}/infer", {**body, "id": "req-7"})
    assert status == 200
    assert v2["id"] == "req-7"


def test_wrong_feature_count_is_a_400_with_a_message(server: Server) -> None:
    status, body = http("POST", f"{server.url}/v1/models/{MODEL}:predict", {"instances": [[1, 2]]})
    assert status == 400
    assert "expected [n, 30]" in body["error"]
    assert "[1, 2]" in body["error"]
    v2 = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    status, body = http("POST", f"{server.url}/v2/models/{MODEL}/infer", v2)
    assert status == 400
    assert "expected [n, 30]" in body["error"]
    status, body = http("POST", f"{server.url}/v1/models/{MODEL}:predict", {"rows": []})
    assert status == 400
    assert '"instances"' in body["error"]


def test_metrics_count_requests_features_and_predictions(server: Server, model_dir: Path) -> None:
    before = metric_samples(server.url)
    rows = breast_cancer_rows(7, offset=3)
    for _ in range(3):
        status, _ = http("POST", f"{server.url}/v1/models/{MODEL}:predict", {"instances": rows})
        assert status == 200
    http("POST", f"{server.url}/v1/models/{MODEL}:predict", {"instances": [[0.0]]})
    after = metric_samples(server.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kubeloop_requests_total", code="200") == 3
    assert delta("kubeloop_requests_total", code="400") == 1
    assert delta("kubeloop_requests_total", code="500") == 0
    assert delta("kubeloop_request_duration_seconds_count") == 4

    reference = load_model(model_dir).reference
    edges = np.asarray(reference["features"]["mean_radius"]["edges"])
    radius = np.asarray(rows)[:, 0]
    expected_buckets = np.clip(np.searchsorted(edges, radius, side="right") - 1, 0, len(edges) - 2)
    for bucket in range(len(edges) - 1):
        want = 3 * int((expected_buckets == bucket).sum())
        got = delta("kubeloop_feature_bucket_total", feature="mean_radius", bucket=str(bucket))
        assert got == want, (bucket, got, want)
    predictions = sum(
        delta("kubeloop_prediction_bucket_total", bucket=str(b))
        for b in range(len(reference["prediction"]["edges"]) - 1)
    )
    assert predictions == 3 * 7
    # every bucket is exported from the start, so drift queries see zeros rather than nothing
    assert ("kubeloop_feature_bucket_total", frozenset(
        {"model": MODEL, "version": VERSION, "feature": "worst_symmetry", "bucket": "9"}.items()
    )) in after  # fmt: skip


async def test_batching_and_cache_serve_concurrent_clients(model_dir: Path, tmp_path: Path) -> None:
    srv = start_server(
        model_dir, tmp_path / "batching.log",
        "--max-batch-size", "16", "--max-latency-ms", "10", "--cache-size", "64",
    )  # fmt: skip
    try:
        rows = breast_cancer_rows(40)
        expected = load_model(model_dir).predict(np.asarray(rows, dtype=np.float32))
        url = f"{srv.url}/v1/models/{MODEL}:predict"
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> list[list[float]]:
                async with session.post(url, json={"instances": [rows[i]]}) as response:
                    assert response.status == 200, await response.text()
                    return list((await response.json())["predictions"])

            for _ in range(2):  # the second round is answered from the cache
                got = await asyncio.gather(*(one(i) for i in range(len(rows))))
                np.testing.assert_allclose(np.asarray(got)[:, 0], expected, rtol=1e-5, atol=1e-6)
        samples = metric_samples(srv.url)
        assert value(samples, "kubeloop_requests_total", code="200") == 80
        # the batched model call is counted once per request row, not per batch
        total = sum(
            value(samples, "kubeloop_feature_bucket_total", feature="mean_radius", bucket=str(b))
            for b in range(10)
        )
        assert total == 80
    finally:
        stop_server(srv)


def test_broken_model_answers_500_and_counts_it(tmp_path: Path) -> None:
    srv = start_server(write_broken_model(tmp_path / "broken"), tmp_path / "broken.log")
    try:
        rows = breast_cancer_rows(2)
        status, body = http("POST", f"{srv.url}/v1/models/{MODEL}:predict", {"instances": rows})
        assert status == 500, body
        v2 = {"inputs": [{"name": "x", "shape": [2, 30], "datatype": "FP32", "data": rows}]}
        status, _ = http("POST", f"{srv.url}/v2/models/{MODEL}/infer", v2)
        assert status == 500
        samples = metric_samples(srv.url)
        assert value(samples, "kubeloop_requests_total", code="500") == 2
        assert value(samples, "kubeloop_requests_total", code="200") == 0
    finally:
        stop_server(srv)


def test_unloadable_artifact_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubeloop.serving", "--model-dir", str(tmp_path / "missing"),
         "--model-name", MODEL, "--model-version", VERSION, "--http-port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "--model-dir" in result.stderr
