"""kserve's ``Model`` over a :class:`Predictor`: how kserve's own ModelServer serves a kubeloop
artifact (``python -m kubeloop.serving --server kserve``), kept as the protocol reference that
the runtime's app (``app``) is tested against side by side.

Requests reach it decoded by kserve (V1: a dict, or bytes without a JSON content type; V2: an
``InferRequest``); the rows are read and checked by ``protocol``, as in the app, so both
answer the same errors. Every request is counted by status code.
"""

from __future__ import annotations

import time
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

from kubeloop.serving import protocol
from kubeloop.serving.launcher import load_predictor
from kubeloop.serving.predictor import Predictor, ServingOptions
from kubeloop.serving.protocol import ProtocolError, Rows, Signature


class KubeloopModel(kserve.Model):  # type: ignore[misc]
    """One served ModelVersion; ``name`` is the deployment's (the URL path and ``model`` label),
    ``version`` the ModelVersion's (the ``version`` label)."""

    def __init__(
        self,
        name: str,
        *,
        model_dir: str | Path,
        version: str,
        options: ServingOptions | None = None,
        max_batch_rows: int = protocol.DEFAULT_MAX_BATCH_ROWS,
    ) -> None:
        # Response headers on: every answer carries X-Request-Id.
        super().__init__(name, return_response_headers=True)
        self.model_dir = Path(model_dir)
        self.version = version
        self.options = options or ServingOptions()
        self.max_batch_rows = max_batch_rows
        self.predictor: Predictor | None = None
        self.signature: Signature | None = None

    def load(self) -> bool:
        """Load the artifact (raises ArtifactError with the reason when it cannot be loaded)."""
        predictor = load_predictor(self.name, self.version, self.model_dir, self.options)
        self.predictor = predictor
        self.signature = Signature.of(predictor.model, self.name, self.version, self.max_batch_rows)
        self.ready = True
        return True

    def _loaded(self) -> tuple[Predictor, Signature]:
        if self.predictor is None or self.signature is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        return self.predictor, self.signature

    def get_input_types(self) -> list[dict[str, object]]:
        return protocol.input_metadata(self._loaded()[1])

    def get_output_types(self) -> list[dict[str, object]]:
        return protocol.output_metadata(self._loaded()[1])

    async def predict(
        self,
        payload: dict[str, Any] | bytes | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        predictor, signature = self._loaded()
        start = time.perf_counter()
        headers = headers or {}
        rid = protocol.request_id(headers.get("x-request-id"), headers.get("ce-id"))
        code = "500"  # a model exception is re-raised, and kserve answers 500 too
        try:
            if isinstance(payload, InferRequest):
                rid = payload.id or rid
                rows, binary = self._v2_rows(payload, signature)
                outputs = await predictor.predict(rows, request_id=rid)
                response: dict[str, Any] | InferResponse = self._v2_response(
                    rid, outputs, signature, payload, binary
                )
            else:
                if isinstance(payload, bytes | bytearray):
                    # kserve hands bodies sent without a JSON content type over undecoded.
                    payload = protocol.decode_json(bytes(payload))
                rows = protocol.v1_rows(payload, signature)
                outputs = await predictor.predict(rows, request_id=rid)
                # kserve encodes with orjson's numpy support (the same bytes as the app's),
                # except CloudEvent answers, which the cloudevents SDK encodes with json.
                predictions = outputs.tolist() if _cloudevent(headers) else outputs
                response = {"predictions": predictions, "model_version": signature.version}
            code = "200"
        except ProtocolError as error:
            code = str(error.status)
            raise InvalidInput(error.message) from None
        finally:
            predictor.metrics.request(code, time.perf_counter() - start)
        if response_headers is not None:
            response_headers["x-request-id"] = rid
        return response

    @staticmethod
    def _v2_rows(request: InferRequest, signature: Signature) -> tuple[Rows, bool]:
        protocol.one_input(len(request.inputs), signature)
        tensor = request.inputs[0]
        # kserve keeps raw (gRPC raw_input_contents) bytes in a private field; JSON data and
        # gRPC contents are lists in ``data``.
        raw = getattr(tensor, "_raw_data", None)
        if raw is None and tensor.datatype == "FP16":
            # kserve refuses FP16 in JSON itself: these values came binary, decoded by kserve.
            raw = np.asarray(tensor.data, dtype="<f2").tobytes()
        if raw is not None:
            rows = protocol.raw_tensor_rows(
                raw, datatype=tensor.datatype, shape=tensor.shape, field="inputs[0]",
                signature=signature,
            )  # fmt: skip
        else:
            contents = protocol.GRPC_CONTENTS.get(tensor.datatype)
            rows = protocol.tensor_rows(
                tensor.data, name=tensor.name, datatype=tensor.datatype, shape=tensor.shape,
                field="inputs[0]", signature=signature,
                # name the field the values came in, as the runtime's gRPC server does
                data_field=f"inputs[0].contents.{contents[0]}"
                if request.from_grpc and contents else "",
            )  # fmt: skip
        requested = request.request_outputs or []
        protocol.checked_outputs([o.name for o in requested], signature)
        return rows, bool(request.use_binary_outputs)

    @staticmethod
    def _v2_response(
        rid: str, outputs: Rows, signature: Signature, request: InferRequest, binary: bool
    ) -> InferResponse:
        output = InferOutput(name=signature.output_name, shape=list(outputs.shape), datatype="FP32")
        output.set_data_from_numpy(outputs, binary_data=binary)
        return InferResponse(
            # kserve 0.21 answers 500 when the response has no id: keep the client's or make one.
            response_id=rid,
            model_name=signature.model,
            model_version=signature.version,
            infer_outputs=[output],
            use_binary_outputs=binary,
            requested_outputs=request.request_outputs,
        )


def _cloudevent(headers: dict[str, str]) -> bool:
    """Whether kserve answers this request as a CloudEvent (binary or structured mode)."""
    return "ce-specversion" in headers or (
        headers.get("content-type") == "application/cloudevents+json"
    )
