"""The model server: a ``kserve.Model`` that serves one kubeloop artifact
(``python -m kubeloop.serving`` runs it in kserve's ModelServer).

It speaks KServe's V1 protocol (``{"instances": [[...], ...]}`` → ``{"predictions": ...}``) and
V2 (one numeric input of shape [n, n_features] → one FP32 output), applies the training
scaling, batches concurrent requests when asked, caches answers when asked, and counts every
request (by status code), its duration and the feature/prediction distributions for drift.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import kserve  # type: ignore[import-untyped]
import numpy as np
from kserve.errors import InvalidInput  # type: ignore[import-untyped]
from kserve.protocol.infer_type import (  # type: ignore[import-untyped]
    InferOutput,
    InferRequest,
    InferResponse,
)

from kubeloop.serving.artifact import LoadedModel, load_model
from kubeloop.serving.batching import Rows, Runner, make_runner
from kubeloop.serving.cache import ResponseCache, rows_key
from kubeloop.serving.metrics import ServingMetrics

NUMERIC_DATATYPES = frozenset(
    {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32"}
)


class KubeloopModel(kserve.Model):  # type: ignore[misc]
    """One served ModelVersion; ``name`` is the deployment's (the URL path and ``model`` label),
    ``version`` the ModelVersion's (the ``version`` label)."""

    def __init__(
        self,
        name: str,
        *,
        model_dir: str | Path,
        version: str,
        max_batch_size: int = 1,
        max_latency_ms: float = 5.0,
        cache_size: int = 0,
        cache_ttl_s: float = 300.0,
    ) -> None:
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.version = version
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.cache_size = cache_size
        self.cache_ttl_s = cache_ttl_s
        self._model: LoadedModel | None = None
        self._runner: Runner | None = None
        self._cache: ResponseCache | None = None
        self._metrics: ServingMetrics | None = None

    @property
    def runner(self) -> Runner | None:
        return self._runner

    def load(self) -> bool:
        """Load the artifact (raises ArtifactError with the reason when it cannot be loaded)."""
        model = load_model(self.model_dir)
        self._model = model
        self._metrics = ServingMetrics(
            self.name, self.version, task=model.task, reference=model.reference
        )
        self._runner = make_runner(
            model.predict, max_batch_size=self.max_batch_size, max_latency_ms=self.max_latency_ms
        )
        self._cache = ResponseCache(self.cache_size, self.cache_ttl_s) if self.cache_size else None
        self.ready = True
        return True

    async def predict(
        self,
        payload: dict[str, Any] | bytes | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        if self._metrics is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        start = time.perf_counter()
        code = "500"
        try:
            response = await self._answer(payload)
            code = "200"
            return response
        except InvalidInput:
            code = "400"
            raise
        finally:
            # A model exception counts as 500 and is re-raised, so kserve answers 500 too.
            self._metrics.request(code, time.perf_counter() - start)

    async def _answer(
        self, payload: dict[str, Any] | InferRequest
    ) -> dict[str, Any] | InferResponse:
        if isinstance(payload, bytes | bytearray):
            # kserve hands V1 bodies sent without a JSON content type over undecoded.
            try:
                payload = json.loads(payload)
            except ValueError as exc:
                raise InvalidInput(f"request body is not JSON: {exc}") from None
        if isinstance(payload, InferRequest):
            outputs = await self._infer(self._v2_rows(payload))
            return self._v2_response(payload, outputs)
        if isinstance(payload, dict):
            outputs = await self._infer(self._v1_rows(payload))
            return {"predictions": outputs.tolist(), "model_version": self.version}
        raise InvalidInput(
            f"unsupported request body of type {type(payload).__name__}; expected V1 JSON "
            '{"instances": [[...], ...]} or a V2 inference request'
        )

    async def _infer(self, rows: Rows) -> Rows:
        assert self._runner is not None
        assert self._metrics is not None
        key = rows_key(rows) if self._cache is not None else b""
        cached = self._cache.get(key) if self._cache is not None else None
        if cached is not None:
            outputs = cached
        else:
            outputs = await self._runner.submit(rows)
            if self._cache is not None:
                self._cache.put(key, outputs)
        self._metrics.observe(rows, outputs)
        return outputs

    def _checked(self, rows: Any, field: str) -> Rows:
        assert self._model is not None
        try:
            return self._model.check_rows(rows)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{field}: {exc}") from None

    def _v1_rows(self, payload: dict[str, Any]) -> Rows:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise InvalidInput(
                f'"instances" must be a list of rows of {self._feature_count()} numbers; '
                f"got {type(instances).__name__}"
            )
        try:
            rows = np.asarray(instances, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(
                f'"instances" must be rows of {self._feature_count()} numbers each: {exc}'
            ) from None
        return self._checked(rows, '"instances"')

    def _v2_rows(self, request: InferRequest) -> Rows:
        if len(request.inputs) != 1:
            raise InvalidInput(
                f"V2 request has {len(request.inputs)} inputs; expected exactly 1 tensor of "
                f"shape [n, {self._feature_count()}]"
            )
        tensor = request.inputs[0]
        if tensor.datatype not in NUMERIC_DATATYPES:
            raise InvalidInput(
                f"input {tensor.name!r} has datatype {tensor.datatype}; expected FP32 "
                f"(or another numeric type: {', '.join(sorted(NUMERIC_DATATYPES))})"
            )
        try:
            array = tensor.as_numpy()
        except ValueError as exc:
            raise InvalidInput(
                f"input {tensor.name!r}: data does not fit its shape: {exc}"
            ) from None
        return self._checked(array, f"input {tensor.name!r}")

    def _v2_response(self, request: InferRequest, outputs: Rows) -> InferResponse:
        assert self._model is not None
        name = "probabilities" if self._model.task == "classification" else "predictions"
        output = InferOutput(name=name, shape=list(outputs.shape), datatype="FP32")
        output.set_data_from_numpy(np.asarray(outputs, dtype=np.float32), binary_data=False)
        return InferResponse(
            # kserve 0.21 answers 500 when the response has no id: keep the client's or make one.
            response_id=request.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=self.version,
            infer_outputs=[output],
        )

    def _feature_count(self) -> int:
        return self._model.n_features if self._model is not None else 0

    def stop(self) -> None:
        super().stop()
