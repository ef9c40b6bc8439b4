"""The metrics path against a real Prometheus (Debian's package), no Kubernetes needed.

Real ``prometheus_client`` exporters on 127.0.0.1 are registered through ``write_targets``
(file_sd), Prometheus scrapes them every second, and ``PrometheusClient`` queries what the
planning module scoped.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hack import prometheus as prometheus_mod
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kubeloop.backends.prometheus import (
    AmbiguousQuery,
    InvalidQuery,
    PrometheusClient,
    PrometheusUnavailable,
)
from kubeloop.backends.scrape_targets import remove_targets, write_targets
from kubeloop.planning.promql import builtin_queries, scope_query
from tests.integration.polling import eventually

try:
    prometheus_mod.find_binary()
except prometheus_mod.PrometheusNotInstalled as exc:
    pytest.skip(str(exc), allow_module_level=True)

NS, OTHER, MODEL = "team-a", "team-b", "churn"


@dataclass
class Exporter:
    port: int
    requests: Counter

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Proportional(Collector):
    """Serving metrics of version ``steady`` that grow with time in fixed proportions.

    Every value is a multiple of one tick count read once per scrape, so rates taken by
    Prometheus keep the same proportions exactly: 25 % errors, all latencies in (0.05, 0.1]
    seconds (p99 = 99.5 ms by interpolation) and twice as many predictions in bucket "a" as "b".
    """

    def __init__(self) -> None:
        self.started = time.monotonic()

    def collect(self) -> Iterable[Metric]:
        n = int((time.monotonic() - self.started) * 20)
        ids = [MODEL, "steady"]
        requests = CounterMetricFamily(
            "kubeloop_requests", "requests", labels=["model", "version", "code"]
        )
        requests.add_metric([*ids, "200"], 3 * n)
        requests.add_metric([*ids, "500"], n)
        latency = HistogramMetricFamily(
            "kubeloop_request_duration_seconds", "latency", labels=["model", "version"]
        )
        latency.add_metric(ids, buckets=[("0.05", 0), ("0.1", n), ("+Inf", n)], sum_value=0.08 * n)
        predictions = CounterMetricFamily(
            "kubeloop_prediction_bucket", "predictions", labels=["model", "version", "bucket"]
        )
        predictions.add_metric([*ids, "a"], 2 * n)
        predictions.add_metric([*ids, "b"], n)
        return [requests, latency, predictions]


def start_exporter(
    registry: CollectorRegistry, requests: Counter
) -> tuple[Exporter, Callable[[], None]]:
    """A real /metrics endpoint for ``registry`` on a free 127.0.0.1 port."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return Exporter(server.server_port, requests), stop


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[prometheus_mod.Prom]:
    state = tmp_path_factory.mktemp("prometheus")
    try:
        yield prometheus_mod.up(state, targets_dir=state / "targets", scrape_interval="1s")
    finally:
        prometheus_mod.down(state)


@pytest.fixture(scope="module")
def tenant(prom: prometheus_mod.Prom) -> Iterator[Exporter]:
    """team-a's model server: a real exporter with its own registry, registered via file_sd."""
    registry = CollectorRegistry()
    requests = Counter(
        "kubeloop_requests", "requests", ["model", "version", "code"], registry=registry
    )
    Counter("kubeloop_idle", "never incremented", registry=registry)
    registry.register(Proportional())
    exporter, stop = start_exporter(registry, requests)
    labels = {"namespace": NS, "model": MODEL, "version": "v1"}
    write_targets(prom.targets_dir, f"{NS}--{MODEL}", [(exporter.address, labels)])
    try:
        yield exporter
    finally:
        remove_targets(prom.targets_dir, f"{NS}--{MODEL}")
        stop()


@pytest.fixture(scope="module")
def neighbour(prom: prometheus_mod.Prom) -> Iterator[Exporter]:
    """Another namespace serving a model of the same name: scoped queries must not see it."""
    registry = CollectorRegistry()
    counter = Counter(
        "kubeloop_requests", "requests", ["model", "version", "code"], registry=registry
    )
    counter.labels(MODEL, "v1", "200").inc(100)
    exporter, stop = start_exporter(registry, counter)
    labels = {"namespace": OTHER, "model": MODEL, "version": "v1"}
    write_targets(prom.targets_dir, f"{OTHER}--{MODEL}", [(exporter.address, labels)])
    try:
        yield exporter
    finally:
        remove_targets(prom.targets_dir, f"{OTHER}--{MODEL}")
        stop()


@pytest.fixture
def client(prom: prometheus_mod.Prom) -> Iterator[PrometheusClient]:
    prometheus = PrometheusClient(prom.url, timeout=5)
    try:
        yield prometheus
    finally:
        prometheus.close()


async def test_scoped_query_sees_increments_of_its_own_namespace_only(
    client: PrometheusClient, tenant: Exporter, neighbour: Exporter
) -> None:
    scoped = scope_query(
        'sum(kubeloop_requests_total{model="churn", version="{{version}}"})',
        NS,
        substitutions={"version": "v1"},
    )
    counter = tenant.requests
    counter.labels(MODEL, "v1", "200").inc(5)
    counter.labels(MODEL, "v1", "500").inc(2)
    assert await eventually(lambda: client.query_value(scoped), lambda v: v == 7.0) == 7.0

    counter.labels(MODEL, "v1", "200").inc(3)
    assert await eventually(lambda: client.query_value(scoped), lambda v: v == 10.0) == 10.0

    # The neighbour's 100 requests are in Prometheus; only scoping kept them out.
    unscoped = 'sum(kubeloop_requests_total{model="churn", version="v1"})'
    assert await eventually(lambda: client.query_value(unscoped), lambda v: v == 110.0) == 110.0


async def test_empty_result_is_none(client: PrometheusClient, tenant: Exporter) -> None:
    await eventually(
        lambda: client.query_value(scope_query('count(up{job="kubeloop-local"})', NS)),
        lambda v: v == 1.0,
    )
    missing = scope_query('sum(kubeloop_requests_total{version="never-served"})', NS)
    assert await client.query_value(missing) is None
    assert await client.query_vector(missing) == {}


async def test_nan_result_is_none(client: PrometheusClient, tenant: Exporter) -> None:
    # A counter that never moves: rate 0 / rate 0 is NaN, a series that exists with no value.
    ratio = scope_query(
        "sum(rate(kubeloop_idle_total[1m])) / sum(rate(kubeloop_idle_total[1m]))", NS
    )
    count = scope_query(f"count({ratio})", NS)
    await eventually(lambda: client.query_value(count), lambda v: v == 1.0)
    assert await client.query_value(ratio) is None
    assert await client.query_value("1 / 0") is None  # +Inf, a scalar


async def test_builtin_queries_measure_a_version(
    client: PrometheusClient, tenant: Exporter
) -> None:
    queries = builtin_queries(NS, MODEL, "steady", "1m")
    error_rate = await eventually(
        lambda: client.query_value(queries["error_rate"]), lambda v: v is not None
    )
    assert error_rate == pytest.approx(0.25, rel=1e-9)
    p99 = await client.query_value(queries["p99_latency_ms"])
    assert p99 == pytest.approx(99.5, rel=1e-9)
    requests = await client.query_value(queries["requests"])
    assert requests is not None
    assert requests > 0

    fractions = await client.query_vector(queries["prediction_fractions"])
    assert set(fractions) == {"a", "b"}
    assert fractions["a"] == pytest.approx(2 * fractions["b"], rel=1e-9)
    by_bucket = await client.query_vector(queries["prediction_fractions"], "bucket")
    assert set(by_bucket) == {"a", "b"}
    assert by_bucket["a"] == pytest.approx(2 * by_bucket["b"], rel=1e-9)

    # Another namespace's view of the same model and version is empty.
    theirs = builtin_queries(OTHER, MODEL, "steady", "1m")
    assert await client.query_value(theirs["requests"]) is None


async def test_several_series_are_ambiguous(client: PrometheusClient, tenant: Exporter) -> None:
    query = scope_query("kubeloop_prediction_bucket_total", NS)
    await eventually(
        lambda: client.query_value(scope_query("count(kubeloop_prediction_bucket_total)", NS)),
        lambda v: v == 2.0,
    )
    with pytest.raises(AmbiguousQuery, match="returned 2 series") as info:
        await client.query_value(query)
    assert "kubeloop_prediction_bucket_total" in str(info.value)
    with pytest.raises(AmbiguousQuery, match="several labels"):
        await client.query_vector(query)


async def test_bad_promql_is_invalid(client: PrometheusClient) -> None:
    with pytest.raises(InvalidQuery, match=r"rejected the query 'sum\(': .*parse error") as info:
        await client.query_value("sum(")
    assert client.url in str(info.value)
    with pytest.raises(InvalidQuery, match="instant vector"):
        await client.query_value("up[1m]")


async def test_removed_targets_stop_being_scraped(
    prom: prometheus_mod.Prom, client: PrometheusClient
) -> None:
    registry = CollectorRegistry()
    requests = Counter("kubeloop_requests", "requests", registry=registry)
    requests.inc()
    exporter, stop = start_exporter(registry, requests)
    up = scope_query('sum(up{model="short-lived"})', "team-c")
    try:
        write_targets(
            prom.targets_dir,
            "team-c--short-lived",
            [(exporter.address, {"namespace": "team-c", "model": "short-lived"})],
        )
        groups = json.loads((prom.targets_dir / "team-c--short-lived.json").read_text())
        assert groups == [
            {
                "targets": [exporter.address],
                "labels": {"namespace": "team-c", "model": "short-lived"},
            }
        ]
        assert await eventually(lambda: client.query_value(up), lambda v: v == 1.0) == 1.0
        remove_targets(prom.targets_dir, "team-c--short-lived")
        assert await eventually(lambda: client.query_value(up), lambda v: v is None) is None
    finally:
        remove_targets(prom.targets_dir, "team-c--short-lived")
        stop()


async def test_stopped_prometheus_is_unavailable(tmp_path: Path) -> None:
    started = prometheus_mod.up(tmp_path / "p", targets_dir=tmp_path / "t")
    client = PrometheusClient(started.url, timeout=2)
    try:
        assert await client.query_value("vector(1)") == 1.0
        # A sub-second timeout is passed on to Prometheus in a form it accepts.
        assert await PrometheusClient(started.url, timeout=0.5).query_value("vector(2)") == 2.0
        # Idempotent: a second `up` finds the running one.
        assert prometheus_mod.up(tmp_path / "p", targets_dir=tmp_path / "t") == started
    finally:
        prometheus_mod.down(tmp_path / "p")
    assert not prometheus_mod.ready(started.url)
    with pytest.raises(PrometheusUnavailable, match=started.url):
        await client.query_value("vector(1)")
    client.close()


class _Answer503(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status":"error","errorType":"unavailable","error":"tsdb is locked"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_5xx_is_unavailable() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(PrometheusUnavailable, match="HTTP 503: tsdb is locked") as info:
            await PrometheusClient(url, timeout=2).query_value("up")
        assert url in str(info.value)
    finally:
        server.shutdown()
        server.server_close()


async def test_timeout_is_unavailable() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(PrometheusUnavailable, match=url):
            await PrometheusClient(url, timeout=0.5).query_value("up")
        assert time.monotonic() - started < 5
