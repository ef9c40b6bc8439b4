"""The labelled-outcome PromQL (planning/feedback_queries.py) against a real Prometheus (Debian's
package) scraping the runtime's real metrics; no Kubernetes needed.

Two proofs. End to end: ``python -m kubeloop.serving`` as a process, requests and labels over
HTTP, Prometheus scraping its ``/metrics``, the request log read back after SIGTERM. In
detail (every measure against scikit-learn and numpy): a trained classifier and a regression
artifact loaded by ``Predictor.load`` with ``recording.attach`` in this process, whose
prometheus_client default registry — the one the runtime exports — is served on 127.0.0.1;
both kinds of target are registered through file_sd, as the operator does for local servers.

Ratios of ``increase``s are exact here: every series is created (at 0) before the first
scrape, so Prometheus extrapolates all of them by the same factor.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from hack import prometheus as prometheus_mod
from prometheus_client import REGISTRY, start_http_server
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from kubeloop.backends.prometheus import PrometheusClient
from kubeloop.backends.scrape_targets import remove_targets, write_targets
from kubeloop.contract.serving_metrics import REQUEST_LOG_DROP_REASONS
from kubeloop.planning import feedback_queries as fq
from kubeloop.planning.promql import scope_query
from kubeloop.serving.artifact import save_model
from kubeloop.serving.feedback import LABEL_DELAY_BUCKETS
from kubeloop.serving.predictor import Predictor, ServingOptions
from kubeloop.serving.recording import attach
from kubeloop.serving.request_log_reader import read_request_log
from kubeloop.serving.samples import CLASSES, breast_cancer, mlp, train_tabular_model
from tests.conftest import ROOT
from tests.integration.polling import eventually

try:
    prometheus_mod.find_binary()
except prometheus_mod.PrometheusNotInstalled as exc:
    pytest.skip(str(exc), allow_module_level=True)

NS, OTHER, WINDOW = "team-a", "team-b", "15m"


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[prometheus_mod.Prom]:
    state = tmp_path_factory.mktemp("prometheus")
    try:
        yield prometheus_mod.up(state, targets_dir=state / "targets", scrape_interval="1s")
    finally:
        prometheus_mod.down(state)


@pytest.fixture
async def client(prom: prometheus_mod.Prom) -> AsyncIterator[PrometheusClient]:
    async with PrometheusClient(prom.url, timeout=5) as prometheus:
        yield prometheus


@dataclass
class Served:
    """What the runtime answered and was told, for the metrics to be checked against."""

    classifier: str
    regressor: str
    actual: list[str] = field(default_factory=list)  # classification labels fed back
    predicted: list[str] = field(default_factory=list)  # and the predictions they joined
    waited: list[float] = field(default_factory=list)  # label delays (seconds)
    errors: list[float] = field(default_factory=list)  # regression: prediction - label


@pytest.fixture(scope="module")
async def served(
    prom: prometheus_mod.Prom, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    """A classifier and a regressor served in this process, scraped by Prometheus as team-a
    (this process's default registry on 127.0.0.1, registered through file_sd), with requests
    answered and labels fed back; yields once Prometheus has scraped the last label."""
    tmp = tmp_path_factory.mktemp("feedback")
    tag = uuid.uuid4().hex[:6]
    options = ServingOptions(request_log_uri=f"file://{tmp}/log")
    classifier = Predictor.load(
        f"cls-{tag}", "v1", train_tabular_model(tmp / "cls", epochs=5), options
    )
    regression_dir = save_model(
        tmp / "reg", mlp(3, 1), task="regression", features=["a", "b", "c"],
        mean=[0.0] * 3, scale=[1.0] * 3, reference={},
    )  # fmt: skip
    regressor = Predictor.load(f"reg-{tag}", "v1", regression_dir, options)
    for predictor in (classifier, regressor):
        attach(predictor, options)

    server, thread = start_http_server(0, addr="127.0.0.1")
    key = f"{NS}--feedback-{tag}"
    # Every series exists now, at 0: the first scrape sees them all.
    write_targets(prom.targets_dir, key, [(f"127.0.0.1:{server.server_port}", {"namespace": NS})])
    async with PrometheusClient(prom.url, timeout=5) as client:
        try:
            truth = Served(classifier.name, regressor.name)
            seen = scope_query(f'sum(kubeloop_feedback_predictions_total{{model=~".*-{tag}"}})', NS)
            await eventually(lambda: client.query_value(seen), lambda v: v == 0.0)
            await classify_and_label(classifier, truth)
            await regress_and_label(regressor, truth)
            matched = scope_query(
                f'sum(kubeloop_feedback_labels_total{{model=~".*-{tag}",outcome="matched"}})', NS
            )
            await eventually(lambda: client.query_value(matched), lambda v: v == 250.0)
            yield truth
        finally:
            remove_targets(prom.targets_dir, key)
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            for predictor in (classifier, regressor):
                await predictor.close()


async def classify_and_label(classifier: Predictor, truth: Served) -> None:
    """200 requests; labels for the first 150 (every 5th one wrong) at known delays, plus a
    duplicate, an unknown id and an invalid label."""
    assert classifier.feedback is not None
    x, y, _ = breast_cancer()
    delays = [2.0, 20.0, 200.0, 900.0]
    for i in range(200):
        request_id, before = f"c-{i}", time.time()
        out = await classifier.predict(x[i : i + 1], request_id=request_id)
        if i >= 150:
            continue
        label = int(y[i]) if i % 5 else 1 - int(y[i])
        delay = delays[i % 4]
        status, _ = classifier.feedback.submit({"id": request_id, "label": label}, before + delay)
        assert status == 200
        truth.actual.append(CLASSES[label])
        truth.predicted.append(CLASSES[int(out.argmax())])
        truth.waited.append(delay)
    now = time.time()
    assert classifier.feedback.submit({"id": "c-0", "label": truth.actual[0]}, now)[0] == 200
    assert classifier.feedback.submit({"id": "stranger", "label": 0}, now)[0] == 404
    assert classifier.feedback.submit({"id": "c-1", "label": "maybe"}, now)[0] == 400


async def regress_and_label(regressor: Predictor, truth: Served) -> None:
    """100 requests, every one labelled at a known error."""
    assert regressor.feedback is not None
    rng = np.random.default_rng(7)
    for i, error in enumerate(rng.normal(0, 3, size=100).tolist()):
        rows = rng.normal(size=(1, 3)).astype(np.float32)
        out = await regressor.predict(rows, request_id=f"r-{i}")
        label = float(out[0]) - error
        assert regressor.feedback.submit({"id": f"r-{i}", "label": label}, time.time())[0] == 200
        truth.errors.append(error)


def histogram_quantile(q: float, bounds: tuple[float, ...], cumulative: list[float]) -> float:
    """Prometheus' interpolation in cumulative buckets (the lowest bucket starts at 0)."""
    rank = q * cumulative[-1]
    below, lower = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            return lower + (bound - lower) * (rank - below) / (count - below)
        below, lower = count, bound
    return bounds[-1]


async def test_accuracy_and_f1_are_those_of_the_labelled_rows(
    served: Served, client: PrometheusClient
) -> None:
    args = (NS, served.classifier, "v1", WINDOW)
    actual, predicted = served.actual, served.predicted
    assert await client.query_value(fq.accuracy(*args)) == pytest.approx(
        accuracy_score(actual, predicted), rel=1e-9
    )
    assert await client.query_value(fq.macro_f1(*args)) == pytest.approx(
        f1_score(actual, predicted, average="macro"), rel=1e-9
    )
    for name in CLASSES:
        assert await client.query_value(fq.class_f1(*args, name)) == pytest.approx(
            f1_score(actual, predicted, pos_label=name), rel=1e-9
        )
        assert await client.query_value(fq.class_precision(*args, name)) == pytest.approx(
            precision_score(actual, predicted, pos_label=name), rel=1e-9
        )
        assert await client.query_value(fq.class_recall(*args, name)) == pytest.approx(
            recall_score(actual, predicted, pos_label=name), rel=1e-9
        )


async def test_mae_and_rmse_are_those_of_the_labelled_rows(
    served: Served, client: PrometheusClient
) -> None:
    args = (NS, served.regressor, "v1", WINDOW)
    errors = np.asarray(served.errors)
    assert await client.query_value(fq.mae(*args)) == pytest.approx(
        float(np.mean(np.abs(errors))), rel=1e-9
    )
    assert await client.query_value(fq.rmse(*args)) == pytest.approx(
        float(np.sqrt(np.mean(np.square(errors)))), rel=1e-9
    )
    median = float(np.median(np.abs(errors)))
    p50 = await client.query_value(fq.absolute_error_quantile(*args, 0.5))
    assert p50 is not None
    assert 0.5 * median < p50 < 2 * median  # interpolated in 1-2.5-5 buckets
    assert await client.query_value(fq.label_coverage(*args)) == pytest.approx(1.0, rel=1e-9)


async def test_coverage_delay_and_unmatched_labels(
    served: Served, client: PrometheusClient
) -> None:
    args = (NS, served.classifier, "v1", WINDOW)
    assert await client.query_value(fq.label_coverage(*args)) == pytest.approx(0.75, rel=1e-9)
    mean_delay = await client.query_value(fq.mean_label_delay_s(*args))
    assert mean_delay is not None
    # the label time was (time before predict) + delay
    assert np.mean(served.waited) - 1 <= mean_delay <= np.mean(served.waited)
    cumulative = [
        REGISTRY.get_sample_value(
            "kubeloop_feedback_label_delay_seconds_bucket",
            {"model": served.classifier, "version": "v1", "le": str(b)},
        )
        or 0.0
        for b in LABEL_DELAY_BUCKETS
    ]
    assert await client.query_value(fq.label_delay_quantile_s(*args, 0.9)) == pytest.approx(
        histogram_quantile(0.9, LABEL_DELAY_BUCKETS, cumulative), rel=1e-9
    )
    unmatched = await client.query_vector(fq.unmatched_labels(*args))
    assert {k: v > 0 for k, v in unmatched.items()} == {
        "duplicate": True, "unknown": True, "invalid": True, "conflict": False, "late": False,
    }  # fmt: skip
    assert unmatched["duplicate"] == pytest.approx(unmatched["unknown"], rel=1e-9)
    drops = await client.query_vector(fq.request_log_drops(*args))
    assert drops == dict.fromkeys(REQUEST_LOG_DROP_REASONS, 0.0)


async def test_the_sample_size_is_the_labelled_count(
    served: Served, client: PrometheusClient
) -> None:
    # A count, unlike a ratio, is extrapolated to the window's end, by up to 1.1 scrape
    # intervals over the series' life: with 12 samples, at most ~10 % over the truth.
    samples = scope_query(
        f'count_over_time(kubeloop_feedback_predictions_total{{model="{served.classifier}"}}'
        f"[{WINDOW}])",
        NS,
    )
    await eventually(lambda: client.query_value(samples), lambda v: v is not None and v >= 12)
    n = await client.query_value(fq.labelled_rows(NS, served.classifier, "v1", WINDOW))
    assert n is not None
    assert 150 <= n <= 150 * (1 + 1.1 / 11)


async def test_every_query_runs_and_another_namespace_sees_nothing(
    served: Served, client: PrometheusClient
) -> None:
    for task, model, positive in (
        ("classification", served.classifier, "benign"),
        ("regression", served.regressor, ""),
    ):
        ours = fq.outcome_queries(NS, model, "v1", WINDOW, task=task, positive_class=positive)
        for name, query in ours.items():
            assert await client.query_value(query) is not None, name
        theirs = fq.outcome_queries(OTHER, model, "v1", WINDOW, task=task, positive_class=positive)
        for name, query in theirs.items():
            assert await client.query_value(query) is None, name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Runtime:
    name: str
    url: str
    port: int
    request_log: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """``python -m kubeloop.serving`` serving a trained classifier on a free 127.0.0.1 port,
    logging requests under ``tmp_path``."""
    name, port = f"e2e-{uuid.uuid4().hex[:6]}", free_port()
    command = [
        sys.executable, "-m", "kubeloop.serving", "--model-dir",
        str(train_tabular_model(tmp_path / "model", epochs=5)), "--model-name", name,
        "--model-version", "v1", "--http-port", str(port), "--host", "127.0.0.1",
        "--request-log-uri", f"file://{tmp_path}/request-log",
    ]  # fmt: skip
    log = tmp_path / "runtime.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Runtime(
            name, f"http://127.0.0.1:{port}", port, f"file://{tmp_path}/request-log", process, log
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def wait_ready(runtime: Runtime) -> None:
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if runtime.process.poll() is not None:
                raise AssertionError(f"the runtime exited:\n{runtime.output()}")
            try:
                async with http.get(f"{runtime.url}/v2/health/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"the runtime was not ready in 90 s:\n{runtime.output()}")


async def test_a_runtime_process_end_to_end(
    prom: prometheus_mod.Prom, client: PrometheusClient, runtime: Runtime
) -> None:
    """Requests and labels over HTTP to ``python -m kubeloop.serving``; Prometheus's accuracy
    and coverage are those of the answers and labels; the request log holds them after
    SIGTERM."""
    name, url = runtime.name, runtime.url
    key = f"{NS}--{name}"
    try:
        await wait_ready(runtime)
        write_targets(prom.targets_dir, key, [(f"127.0.0.1:{runtime.port}", {"namespace": NS})])
        seen = scope_query(f'sum(kubeloop_feedback_predictions_total{{model="{name}"}})', NS)
        await eventually(lambda: client.query_value(seen), lambda v: v == 0.0, within=60)

        x, y, _ = breast_cancer()
        predicted, actual = [], []
        async with aiohttp.ClientSession() as http:
            for i in range(60):
                async with http.post(
                    f"{url}/v1/models/{name}:predict",
                    json={"instances": [x[i].tolist()]},
                    headers={"X-Request-Id": f"{name}-{i}"},
                ) as response:
                    assert response.status == 200
                    assert response.headers["x-request-id"] == f"{name}-{i}"
                    answer = await response.json()
                predicted.append(CLASSES[int(np.argmax(answer["predictions"][0]))])
            actual = [CLASSES[int(y[i]) if i % 4 else 1 - int(y[i])] for i in range(45)]
            batch = [{"id": f"{name}-{i}", "label": label} for i, label in enumerate(actual)]
            async with http.post(f"{url}/v2/models/{name}/feedback", json=batch) as response:
                assert response.status == 200
                assert (await response.json())["counts"]["matched"] == 45
            async with http.post(
                f"{url}/v1/models/{name}:feedback", json={"id": f"{name}-50", "label": 2.5}
            ) as response:
                assert response.status == 400
                assert (await response.json())["field"] == "label"

        matched = scope_query(
            f'sum(kubeloop_feedback_labels_total{{model="{name}",outcome="matched"}})', NS
        )
        await eventually(lambda: client.query_value(matched), lambda v: v == 45.0)
        args = (NS, name, "v1", WINDOW)
        assert await client.query_value(fq.accuracy(*args)) == pytest.approx(
            accuracy_score(actual, predicted[:45]), rel=1e-9
        )
        assert await client.query_value(fq.label_coverage(*args)) == pytest.approx(0.75, rel=1e-9)

        runtime.process.send_signal(signal.SIGTERM)
        assert runtime.process.wait(timeout=30) == 0, runtime.output()
    finally:
        remove_targets(prom.targets_dir, key)
    data = read_request_log(runtime.request_log)
    assert data.frame["id"].tolist() == [f"{name}-{i}" for i in range(60)]
    np.testing.assert_array_equal(data.frame[data.features].to_numpy(), x[:60])
    assert data.frame["prediction"].tolist() == predicted
    assert data.labelled["label"].tolist() == actual
