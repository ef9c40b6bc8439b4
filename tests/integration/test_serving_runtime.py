"""The real serving runtime: `python -m kubeloop.serving` as a subprocess on 127.0.0.1, a real
trained torch model, real HTTP (V1, V2, readiness, /metrics, feedback). The behaviour tests run
against the runtime's own app and against kserve's ModelServer with the adapter
(``--server kserve``, the protocol reference). No Kubernetes cluster needed."""

from __future__ import annotations

import asyncio
import json
import signal
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
    kind: str = "kubeloop"  # --server: kubeloop (the runtime's app) or kserve (the reference)


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    return http_with_headers(method, url, body, headers)[:2]


def http_with_headers(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw, status, got = response.read(), response.status, response.headers
    except urllib.error.HTTPError as exc:
        raw, status, got = exc.read(), exc.code, exc.headers
    text = raw.decode()
    answer = {k.lower(): v for k, v in got.items()}
    try:
        return status, json.loads(text), answer
    except ValueError:
        return status, text, answer


def start_server(model_dir: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "kubeloop.serving", "--model-dir", str(model_dir),
        "--model-name", MODEL, "--model-version", VERSION, "--http-port", str(port), *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    kind = extra[extra.index("--server") + 1] if "--server" in extra else "kubeloop"
    server = Server(f"http://127.0.0.1:{port}", process, log, kind)
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


@pytest.fixture(scope="module", params=["kubeloop", "kserve"])
def server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(model_dir, log, "--server", request.param)
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


def test_runtime_runs_on_uvloop_and_echoes_request_ids(model_dir: Path, tmp_path: Path) -> None:
    srv = start_server(model_dir, tmp_path / "ids.log")
    try:
        status, body, headers = http_with_headers(
            "POST", f"{srv.url}/v1/models/{MODEL}:predict", {"instances": breast_cancer_rows(1)},
            {"X-Request-Id": "client-7"},
        )  # fmt: skip
        assert status == 200, body
        assert headers["x-request-id"] == "client-7"
        status, body, headers = http_with_headers(
            "POST", f"{srv.url}/v1/models/{MODEL}:predict", {"instances": [[1.0]]}
        )
        assert status == 400
        assert headers["x-request-id"]  # a generated one: errors carry an id too
    finally:
        stop_server(srv)
    log = srv.log.read_text()
    assert f"serving model {MODEL} version {VERSION}" in log
    assert "loop uvloop.Loop, http httptools" in log
    assert "POST /v1/models" not in log  # no access log, no per-request lines


def test_labels_fed_back_by_request_id(server: Server) -> None:
    rows = breast_cancer_rows(2, offset=5)
    body = {"id": "fb-1", "inputs": [{"name": "x", "shape": [2, 30], "datatype": "FP32",
                                      "data": rows}]}  # fmt: skip
    status, answer = http("POST", f"{server.url}/v2/models/{MODEL}/infer", body)
    assert status == 200, answer
    feedback = f"{server.url}/v2/models/{MODEL}/feedback"
    status, answer = http("POST", feedback, {"id": "fb-1", "row": 1, "label": "benign"})
    if server.kind == "kserve":
        assert (status, answer) == (404, {"detail": "Not Found"})  # kserve has no such route
        return
    assert (status, answer["status"], answer["row"]) == (200, "matched", 1), answer
    status, answer = http("POST", feedback, {"id": "fb-1", "row": 1, "label": "malignant"})
    assert (status, answer["status"]) == (409, "conflict")
    status, answer = http("POST", f"{server.url}/v1/models/{MODEL}:feedback",
                          {"id": "never-answered", "label": "benign"})  # fmt: skip
    assert status == 404
    assert answer["status"] == "unknown"


def test_sigterm_drains_stops_and_flushes_the_request_log(model_dir: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "request-log"
    srv = start_server(
        model_dir, tmp_path / "term.log", "--request-log-uri", str(log_dir),
        "--grpc-port", str(free_port()),
    )  # fmt: skip
    for i in range(5):
        rows = breast_cancer_rows(1, offset=i)
        status, _ = http("POST", f"{srv.url}/v1/models/{MODEL}:predict", {"instances": rows})
        assert status == 200
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(timeout=30) == 0, srv.log.read_text()
    files = sorted((log_dir / "predictions" / VERSION).glob("*.parquet"))
    assert files, list(log_dir.rglob("*"))
    assert sum(int(f.stem.rsplit("_r", 1)[1]) for f in files) == 5
