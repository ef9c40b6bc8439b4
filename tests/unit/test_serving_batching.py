"""The micro-batcher with a real trained torch model: every caller gets its own rows back,
concurrent callers share model calls, and the latency bound holds for a lone caller."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kubeloop.serving.artifact import LoadedModel, load_model
from kubeloop.serving.batching import DirectRunner, MicroBatcher, Rows, make_runner
from kubeloop.serving.samples import breast_cancer, train_tabular_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path: Path = train_tabular_model(tmp_path_factory.mktemp("tabular"))
    return load_model(path)


async def test_concurrent_callers_get_their_own_rows_in_shared_batches(model: LoadedModel) -> None:
    x, _, _ = breast_cancer()
    threads: set[int] = set()

    def predict(rows: Rows) -> Rows:
        threads.add(threading.get_ident())
        return model.predict(rows)

    batcher = MicroBatcher(predict, max_batch_size=16, max_latency_ms=20)
    try:
        # 64 callers with 1..3 rows each, all at once
        requests = [x[i : i + 1 + i % 3] for i in range(64)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    finally:
        await batcher.close()
    for rows, got in zip(requests, results, strict=True):
        np.testing.assert_allclose(got, model.predict(rows), rtol=1e-5, atol=1e-6)
    sizes = list(batcher.stats.sizes)
    assert sum(sizes) == sum(len(r) for r in requests)
    assert max(sizes) > 1, sizes  # calls were really shared
    assert max(sizes) <= 16, sizes  # and never over the limit
    assert batcher.stats.calls < len(requests)
    assert threading.get_ident() not in threads  # the model ran off the event loop


async def test_lone_caller_waits_at_most_the_latency_bound(model: LoadedModel) -> None:
    x, _, _ = breast_cancer()
    batcher = MicroBatcher(model.predict, max_batch_size=64, max_latency_ms=50)
    try:
        await batcher.submit(x[:1])  # warm-up: the first call starts the loop
        start = time.perf_counter()
        got = await batcher.submit(x[:1])
        elapsed = time.perf_counter() - start
    finally:
        await batcher.close()
    assert got.shape == (1, 2)
    assert 0.045 <= elapsed < 0.5, elapsed  # it waited for company, but not much longer


async def test_full_batch_does_not_wait_for_the_deadline(model: LoadedModel) -> None:
    x, _, _ = breast_cancer()
    batcher = MicroBatcher(model.predict, max_batch_size=4, max_latency_ms=2000)
    try:
        start = time.perf_counter()
        await asyncio.gather(*(batcher.submit(x[i : i + 1]) for i in range(4)))
        elapsed = time.perf_counter() - start
    finally:
        await batcher.close()
    assert elapsed < 1.0, elapsed
    assert list(batcher.stats.sizes) == [4]


async def test_model_errors_reach_every_caller_of_the_batch() -> None:
    def failing(rows: Rows) -> Rows:
        raise RuntimeError("model exploded")

    batcher = MicroBatcher(failing, max_batch_size=8, max_latency_ms=10)
    try:
        results = await asyncio.gather(
            *(batcher.submit(np.zeros((1, 3), np.float32)) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, RuntimeError) for r in results), results
        # the loop survives a failed batch
        batcher._predict = lambda rows: rows * 2
        got = await batcher.submit(np.ones((1, 3), np.float32))
        assert got.tolist() == [[2.0, 2.0, 2.0]]
    finally:
        await batcher.close()


async def test_oversized_request_runs_alone_and_is_not_split(model: LoadedModel) -> None:
    x, _, _ = breast_cancer()
    batcher = MicroBatcher(model.predict, max_batch_size=4, max_latency_ms=5)
    try:
        got = await batcher.submit(x[:10])
    finally:
        await batcher.close()
    assert got.shape == (10, 2)
    assert list(batcher.stats.sizes) == [10]


def test_batching_off_is_a_direct_call(model: LoadedModel) -> None:
    assert isinstance(make_runner(model.predict, max_batch_size=1, max_latency_ms=5), DirectRunner)
    assert isinstance(make_runner(model.predict, max_batch_size=8, max_latency_ms=5), MicroBatcher)
    with pytest.raises(ValueError, match="max_batch_size=0"):
        MicroBatcher(model.predict, max_batch_size=0)
