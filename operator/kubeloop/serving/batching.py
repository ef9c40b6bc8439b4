"""Dynamic batching: concurrent requests share one model call.

Requests are queued; one loop takes the first, then waits at most ``max_latency_ms`` for more
until ``max_batch_size`` rows are gathered, runs the model once in a worker thread (so the event
loop keeps accepting requests while it runs) and hands every request its own rows back.
A request larger than ``max_batch_size`` runs as a batch of its own; requests are never split.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.float32]
PredictFn = Callable[[Rows], Rows]


class Runner(Protocol):
    async def submit(self, rows: Rows) -> Rows: ...

    async def close(self) -> None: ...


class DirectRunner:
    """Batching off: each request calls the model itself, on the event loop (no thread hop)."""

    def __init__(self, predict: PredictFn) -> None:
        self._predict = predict

    async def submit(self, rows: Rows) -> Rows:
        return self._predict(rows)

    async def close(self) -> None:
        return None


@dataclass
class _Pending:
    rows: Rows
    future: asyncio.Future[Rows]


@dataclass
class BatchStats:
    """Recent batch sizes (rows per model call), for tests and debugging."""

    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))
    calls: int = 0


class MicroBatcher:
    """Gathers concurrent :meth:`submit` calls into batches of at most ``max_batch_size`` rows."""

    def __init__(
        self, predict: PredictFn, *, max_batch_size: int, max_latency_ms: float = 5.0
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}; expected an integer >= 1")
        if max_latency_ms < 0:
            raise ValueError(f"max_latency_ms={max_latency_ms}; expected a number >= 0")
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._carry: _Pending | None = None  # taken from the queue but did not fit the last batch

    async def submit(self, rows: Rows) -> Rows:
        if self._queue is None or self._loop_task is None or self._loop_task.done():
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.create_task(self._run(), name="kubeloop-micro-batcher")
        future: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(rows, future))
        return await future

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None

    async def _next_batch(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        first = self._carry or await queue.get()
        self._carry = None
        batch, n_rows = [first], len(first.rows)
        deadline = time.monotonic() + self.max_latency_s
        while n_rows < self.max_batch_size:
            try:
                if queue.empty():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    item = await asyncio.wait_for(queue.get(), remaining)
                else:
                    item = queue.get_nowait()
            except TimeoutError:
                break
            if n_rows + len(item.rows) > self.max_batch_size:
                self._carry = item
                break
            batch.append(item)
            n_rows += len(item.rows)
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = await self._next_batch(queue)
            live = [p for p in batch if not p.future.done()]  # a cancelled client left
            if not live:
                continue
            rows = live[0].rows if len(live) == 1 else np.concatenate([p.rows for p in live])
            self.stats.sizes.append(len(rows))
            self.stats.calls += 1
            try:
                outputs = await asyncio.to_thread(self._predict, rows)
            except Exception as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            start = 0
            for p in live:
                end = start + len(p.rows)
                if not p.future.done():
                    p.future.set_result(outputs[start:end])
                start = end


def make_runner(predict: PredictFn, *, max_batch_size: int, max_latency_ms: float) -> Runner:
    """Batching is on when ``max_batch_size`` > 1; otherwise requests call the model directly."""
    if max_batch_size <= 1:
        return DirectRunner(predict)
    return MicroBatcher(predict, max_batch_size=max_batch_size, max_latency_ms=max_latency_ms)
