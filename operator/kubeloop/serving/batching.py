"""Dynamic batching that never makes a request wait for nothing.

The rule is Triton's with its default zero queue delay: when the model is free, run at once
whatever is already waiting. A lone request on an idle server therefore runs on the next turn
of the event loop, never after a timer; under load, requests that arrive while a batch runs
queue up and become the next batch by themselves. The only deliberate wait is bounded: while
more requests keep reaching :meth:`MicroBatcher.submit` turn after turn (a burst being parsed),
the batch is held open one more loop turn at a time, until it is full or its oldest request has
waited ``max_latency_ms``.

The model runs on the event loop's own thread, as the unbatched :class:`DirectRunner` does.
A worker thread would let the loop parse requests while the model computes, but both threads
then take turns on the GIL: the worker needs it back after every torch op, and under load it
waits for the loop to let go (up to the 5 ms switch interval each time), which is how the
threaded batcher lost throughput and its p99 went from 22 ms to 214 ms. Requests that arrive
during a batch wait in the socket buffers and are read together on the next turn, which is what
forms the next batch.

A request of ``max_batch_size`` rows or more is already a batch: it runs as it arrives (after
the requests queued before it), vectorised, never split and never merged.
"""

from __future__ import annotations

import asyncio
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
    at: float  # time.monotonic() when it was submitted


@dataclass
class BatchStats:
    """Recent batch sizes (rows per model call) and how long their oldest request waited to
    be run, for tests and debugging."""

    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))
    waits_s: deque[float] = field(default_factory=lambda: deque(maxlen=1024))
    calls: int = 0


class MicroBatcher:
    """Gathers concurrent :meth:`submit` calls into batches of at most ``max_batch_size`` rows
    (a single larger request runs alone); see the module docstring for when a batch runs."""

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
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._seen = 0  # queue length when the scheduled run was last looked at
        self._handle: asyncio.Handle | None = None
        self._closed = False

    async def submit(self, rows: Rows) -> Rows:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Rows] = loop.create_future()
        self._queue.append(_Pending(rows, future, time.monotonic()))
        self._queued_rows += len(rows)
        if self._handle is None:
            self._seen = len(self._queue)
            self._handle = loop.call_soon(self._run_ready, loop)
        return await future

    async def close(self) -> None:
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.cancel()
        self._queued_rows = 0

    def _run_ready(self, loop: asyncio.AbstractEventLoop) -> None:
        """One loop turn after the first request queued: run what is waiting, or hold the
        batch one more turn while requests are still arriving (bounded by max_latency_ms)."""
        self._handle = None
        if not self._queue:
            return
        arriving = len(self._queue) > self._seen
        waited = time.monotonic() - self._queue[0].at
        if arriving and self._queued_rows < self.max_batch_size and waited < self.max_latency_s:
            self._seen = len(self._queue)
            self._handle = loop.call_soon(self._run_ready, loop)
            return
        self._run(self._take(), waited)
        if self._queue:  # more than one batch was waiting: the rest runs on the next turn
            self._seen = len(self._queue)
            self._handle = loop.call_soon(self._run_ready, loop)

    def _take(self) -> list[_Pending]:
        """The requests of the next batch, in arrival order: at least one, then as many as
        fit in ``max_batch_size`` rows."""
        first = self._queue.popleft()
        batch, n_rows = [first], len(first.rows)
        while self._queue and n_rows + len(self._queue[0].rows) <= self.max_batch_size:
            item = self._queue.popleft()
            batch.append(item)
            n_rows += len(item.rows)
        self._queued_rows -= n_rows
        return batch

    def _run(self, batch: list[_Pending], waited: float) -> None:
        live = [p for p in batch if not p.future.done()]  # a cancelled client left
        if not live:
            return
        rows = live[0].rows if len(live) == 1 else np.concatenate([p.rows for p in live])
        self.stats.sizes.append(len(rows))
        self.stats.waits_s.append(waited)
        self.stats.calls += 1
        try:
            outputs = self._predict(rows)
        except Exception as exc:
            for p in live:
                p.future.set_exception(exc)
            return
        start = 0
        for p in live:
            end = start + len(p.rows)
            p.future.set_result(outputs[start:end])
            start = end


def make_runner(predict: PredictFn, *, max_batch_size: int, max_latency_ms: float) -> Runner:
    """Batching is on when ``max_batch_size`` > 1; otherwise requests call the model directly."""
    if max_batch_size <= 1:
        return DirectRunner(predict)
    return MicroBatcher(predict, max_batch_size=max_batch_size, max_latency_ms=max_latency_ms)
