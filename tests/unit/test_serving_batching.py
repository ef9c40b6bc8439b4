"""The micro-batcher with a real trained torch model: every caller gets its own rows back,
concurrent callers share model calls, a lone request is not held back by ``max_latency_ms``
(it runs on the next loop turn, like Triton's zero queue delay), a batch held open for
arriving requests is held at most ``max_latency_ms``, and large requests run as they come."""

from __future__ import annotations

import asyncio
import statistics
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
    # On the loop's own thread, as without batching: no GIL hand-off to a worker per torch op.
    assert threads == {threading.get_ident()}


async def test_a_lone_request_is_not_delayed_by_max_latency_ms(model: LoadedModel) -> None:
    """With nothing else queued the request runs on the next loop turn: it costs what a direct
    call costs, however long ``max_latency_ms`` is (the old batcher waited it out)."""
    x, _, _ = breast_cancer()
    direct = DirectRunner(model.predict)
    batcher = MicroBatcher(model.predict, max_batch_size=64, max_latency_ms=200)

    async def timed(runner: DirectRunner | MicroBatcher) -> float:
        start = time.perf_counter()
        got = await runner.submit(x[:1])
        elapsed = time.perf_counter() - start
        assert got.shape == (1, 2)
        return elapsed

    try:
        plain, batched = [], []
        for _ in range(60):  # interleaved, so a busy machine slows both alike
            plain.append(await timed(direct))
            batched.append(await timed(batcher))
    finally:
        await batcher.close()
    print(
        f"lone request: direct median {statistics.median(plain) * 1e3:.3f} ms, "
        f"batcher median {statistics.median(batched) * 1e3:.3f} ms (max_latency_ms=200)"
    )
    assert statistics.median(batched) < statistics.median(plain) + 0.001
    assert max(batched) < 0.1  # never the 200 ms bound
    assert list(batcher.stats.sizes) == [1] * 60
    assert max(batcher.stats.waits_s) < 0.05


async def test_a_batch_held_open_for_arrivals_waits_at_most_max_latency_ms(
    model: LoadedModel,
) -> None:
    """Requests that keep arriving while a batch is about to run (several a loop turn: a burst
    being parsed) keep it open, but its oldest request never waits longer than
    ``max_latency_ms``."""
    x, _, _ = breast_cancer()
    bound_s = 0.02
    batcher = MicroBatcher(model.predict, max_batch_size=100_000, max_latency_ms=bound_s * 1e3)
    tasks: list[asyncio.Task[Rows]] = []
    longest_turn = 0.0  # a busy machine stretches a loop turn; the bound is noticed a turn late
    try:
        start = last = time.monotonic()
        # three arrivals a loop turn until the bound has cut six batches (a generous safety
        # limit, so a batcher that never cuts fails below instead of hanging)
        while len(batcher.stats.sizes) < 6 and time.monotonic() - start < 10.0:
            for _ in range(3):
                tasks.append(asyncio.create_task(batcher.submit(x[len(tasks) % len(x)][None, :])))
            busy_until = time.perf_counter() + 0.0002  # a loop turn costs something (parsing)
            while time.perf_counter() < busy_until:
                pass
            await asyncio.sleep(0)
            now = time.monotonic()
            longest_turn, last = max(longest_turn, now - last), now
        await asyncio.gather(*tasks)
    finally:
        await batcher.close()
    sizes, waits = list(batcher.stats.sizes), list(batcher.stats.waits_s)
    assert sum(sizes) == len(tasks)
    assert len(sizes) >= 6, sizes  # the stream was cut into batches by the bound...
    assert statistics.mean(sizes[:6]) > 10, sizes  # ...after holding them open for company
    # the bound, plus the one turn (and model call) it takes to notice it was reached
    assert max(waits) < bound_s + longest_turn + 0.005, (waits, longest_turn)


async def test_a_full_batch_does_not_wait_for_the_deadline(model: LoadedModel) -> None:
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


async def test_a_large_request_runs_as_it_arrives_after_those_before_it(
    model: LoadedModel,
) -> None:
    x, _, _ = breast_cancer()
    batcher = MicroBatcher(model.predict, max_batch_size=4, max_latency_ms=2000)
    try:
        start = time.perf_counter()
        got = await batcher.submit(x[:10])  # more rows than a batch: vectorised, not split
        elapsed = time.perf_counter() - start
        small = [batcher.submit(x[i : i + 1]) for i in range(3)]
        results = await asyncio.gather(*small, batcher.submit(x[:10]))
    finally:
        await batcher.close()
    assert got.shape == (10, 2)
    assert elapsed < 1.0, elapsed  # not held for company
    np.testing.assert_allclose(results[-1], model.predict(x[:10]), rtol=1e-5, atol=1e-6)
    assert list(batcher.stats.sizes) == [10, 3, 10]  # in arrival order, never merged


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
        assert list(batcher.stats.sizes) == [3]
        # the batcher survives a failed batch
        batcher._predict = lambda rows: rows * 2
        got = await batcher.submit(np.ones((1, 3), np.float32))
        assert got.tolist() == [[2.0, 2.0, 2.0]]
    finally:
        await batcher.close()


async def test_a_caller_that_left_is_skipped_and_close_refuses_new_work() -> None:
    calls: list[int] = []

    def predict(rows: Rows) -> Rows:
        calls.append(len(rows))
        return rows + 1

    batcher = MicroBatcher(predict, max_batch_size=8, max_latency_ms=10)
    gone = asyncio.create_task(batcher.submit(np.zeros((2, 1), np.float32)))
    stays = asyncio.create_task(batcher.submit(np.zeros((1, 1), np.float32)))
    await asyncio.sleep(0)  # both queued
    gone.cancel()
    assert (await stays).tolist() == [[1.0]]
    assert calls == [1]  # the cancelled caller's rows were not run
    await batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(np.zeros((1, 1), np.float32))


def test_batching_off_is_a_direct_call(model: LoadedModel) -> None:
    assert isinstance(make_runner(model.predict, max_batch_size=1, max_latency_ms=5), DirectRunner)
    assert isinstance(make_runner(model.predict, max_batch_size=8, max_latency_ms=5), MicroBatcher)
    with pytest.raises(ValueError, match="max_batch_size=0"):
        MicroBatcher(model.predict, max_batch_size=0)
    with pytest.raises(ValueError, match="max_latency_ms=-1"):
        MicroBatcher(model.predict, max_batch_size=2, max_latency_ms=-1)
