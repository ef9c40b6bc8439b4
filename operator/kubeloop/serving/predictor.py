"""One served ModelVersion, independent of the wire protocol.

The HTTP app, the gRPC server (and kserve's ``Model`` adapter kept as the protocol reference)
all call :meth:`Predictor.predict` with raw rows and a request id. It runs the model through
the runner (direct, or dynamic batching), answers from the cache when asked, counts the
feature and prediction histograms, and hands every answered request to the recorders (the
feedback store that joins labels by id, the request log that becomes training data). A
recorder never blocks a request: each one queues or drops, and counts what it dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kubeloop.serving.artifact import LoadedModel, load_model
from kubeloop.serving.batching import Rows, Runner, make_runner
from kubeloop.serving.cache import ResponseCache, rows_key
from kubeloop.serving.metrics import ServingMetrics


class Recorder(Protocol):
    """Something that keeps what was answered (must return at once: queue or drop)."""

    def record(self, request_id: str, rows: Rows, outputs: Rows, at: float) -> None: ...

    async def close(self) -> None: ...


class FeedbackHandler(Protocol):
    """Joins ground-truth labels fed back by request id (``serving/recording.py``)."""

    def submit(self, payload: object, at: float) -> tuple[int, dict[str, object]]:
        """(HTTP status, JSON body) for one feedback request body (already JSON-decoded)."""
        ...


@dataclass(frozen=True)
class ServingOptions:
    """How one version is served (``python -m kubeloop.serving`` flags)."""

    max_batch_size: int = 1  # rows per model call; 1 = batching off
    max_latency_ms: float = 5.0  # the longest a request waits for others to join its batch
    cache_size: int = 0  # cached answers; 0 = off
    cache_ttl_s: float = 300.0
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    feedback_ttl_s: float = 3600.0  # how long a prediction waits for its label
    request_log_uri: str = ""  # where the request log's Parquet files go; '' = off
    request_log_sample: float = 1.0  # share of requests logged
    request_log_max_rows: int = 1_000_000  # rows kept (older files are removed)
    request_log_flush_s: float = 30.0  # a file at least this often while rows come
    # Prediction-histogram edges shared by every version of the model (regression: the first
    # version's reference edges); () = the artifact's own, or fixed score edges (classifiers).
    prediction_edges: tuple[float, ...] = ()


@dataclass
class Predictor:
    name: str  # the deployment: the URL path and the ``model`` label
    version: str  # the ModelVersion: the ``version`` label
    model: LoadedModel
    runner: Runner
    metrics: ServingMetrics
    cache: ResponseCache | None = None
    recorders: list[Recorder] = field(default_factory=list)
    feedback: FeedbackHandler | None = None  # None: the feedback route answers 404

    @classmethod
    def load(
        cls, name: str, version: str, model_dir: str | Path, options: ServingOptions
    ) -> Predictor:
        """Load the artifact (``ArtifactError`` says why it cannot be loaded)."""
        model = load_model(model_dir, device=options.device)
        return cls(
            name=name,
            version=version,
            model=model,
            runner=make_runner(
                model.predict,
                max_batch_size=options.max_batch_size,
                max_latency_ms=options.max_latency_ms,
            ),
            metrics=ServingMetrics(
                name,
                version,
                task=model.task,
                reference=model.reference,
                prediction_edges=options.prediction_edges,
            ),
            cache=ResponseCache(options.cache_size, options.cache_ttl_s)
            if options.cache_size > 0
            else None,
        )

    def add_recorders(self, recorders: Sequence[Recorder]) -> None:
        self.recorders.extend(recorders)

    async def predict(self, rows: Rows, *, request_id: str) -> Rows:
        """The model's outputs for ``rows`` (already checked with ``model.check_rows``)."""
        key = rows_key(rows) if self.cache is not None else b""
        outputs = self.cache.get(key) if self.cache is not None else None
        if outputs is None:
            outputs = await self.runner.submit(rows)
            if self.cache is not None:
                self.cache.put(key, outputs)
        self.metrics.observe(rows, outputs)
        now = time.time()
        for recorder in self.recorders:
            recorder.record(request_id, rows, outputs, now)
        return outputs

    async def close(self) -> None:
        await self.runner.close()
        for recorder in self.recorders:
            await recorder.close()
