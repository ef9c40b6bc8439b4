"""The V2 (Open Inference Protocol) gRPC server: ``inference.GRPCInferenceService`` on
grpc.aio, on the HTTP app's event loop and sharing its state (readiness, the predictor, the
counters), with kserve's generated messages.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and
ModelInfer (values in the ``contents`` field of the tensor's datatype, or little-endian bytes
in ``raw_input_contents``; raw inputs get raw outputs, as kserve answers). The repository
methods answer UNIMPLEMENTED. Errors are status codes with the HTTP app's messages:
INVALID_ARGUMENT (bad input), NOT_FOUND (another model or version), INTERNAL (the model
failed); ServerReady turns false while the server drains. The request id is the request's
``id``, else the ``x-request-id`` (or ``ce-id``) metadata, else a uuid4; it comes back in the
response's ``id`` and as ``x-request-id`` trailing metadata.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import grpc  # type: ignore[import-untyped]
import numpy as np

from kubeloop.serving import protocol
from kubeloop.serving.protocol import DATATYPES, GRPC_CONTENTS, ProtocolError, Rows

if TYPE_CHECKING:
    from kubeloop.serving.app import ServingApp

SERVICE = "inference.GRPCInferenceService"
KSERVE_STUBS = "kserve.protocol.grpc.grpc_predict_v2_pb2"

STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
}


@cache
def stubs() -> ModuleType:
    """kserve's generated V2 messages (``grpc_predict_v2_pb2``), loaded from kserve's file
    without importing the ``kserve`` package: its ``__init__`` imports the whole ModelServer
    (FastAPI, pandas, the Kubernetes client) and parses ``sys.argv``. One module either way:
    a later ``import kserve`` finds it under its own name."""
    if KSERVE_STUBS in sys.modules:
        return sys.modules[KSERVE_STUBS]
    package = importlib.util.find_spec("kserve")
    if package is None or not package.submodule_search_locations:
        raise ImportError("kserve is not installed: the gRPC server uses its V2 messages")
    path = Path(package.submodule_search_locations[0], "protocol", "grpc", "grpc_predict_v2_pb2.py")
    spec = importlib.util.spec_from_file_location(KSERVE_STUBS, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load kserve's V2 gRPC messages from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[KSERVE_STUBS] = module
    return module


def _metadata(context: Any, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            return str(item[1])
    return None


class InferenceServicer:
    """The methods of ``inference.GRPCInferenceService`` over one :class:`ServingApp`."""

    def __init__(self, app: ServingApp) -> None:
        self.app = app
        self.pb = stubs()

    def _check_model(self, name: str, version: str) -> None:
        sig = self.app.signature
        if name != sig.model:
            raise protocol.unknown_model(name, sig)
        if version and version != sig.version:
            raise protocol.unknown_version(version, sig)

    async def _abort(self, context: Any, error: ProtocolError) -> NoReturn:
        await context.abort(STATUS.get(error.status, grpc.StatusCode.UNKNOWN), error.message)
        raise AssertionError("grpc.aio's abort() raises")  # pragma: no cover

    # The methods carry the RPC names of the .proto.
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=self.app.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self._check_model(request.name, request.version)
        except ProtocolError as error:
            await self._abort(context, error)
        return self.pb.ModelReadyResponse(ready=self.app.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self.pb.ServerMetadataResponse(**protocol.server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            self._check_model(request.name, request.version)
        except ProtocolError as error:
            await self._abort(context, error)
        sig = self.app.signature
        tensor = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=sig.model,
            versions=[sig.version],
            platform="",
            inputs=[tensor(**t) for t in protocol.input_metadata(sig)],
            outputs=[tensor(**t) for t in protocol.output_metadata(sig)],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        start = time.perf_counter()
        rid = protocol.request_id(
            request.id, _metadata(context, "x-request-id"), _metadata(context, "ce-id")
        )
        try:
            self._check_model(request.model_name, request.model_version)
            rows = self._rows(request)
            protocol.checked_outputs([o.name for o in request.outputs], self.app.signature)
            outputs = await self.app.predict(rows, rid)
            response = self._response(rid, outputs, raw=bool(request.raw_input_contents))
        except ProtocolError as error:
            self.app.predictor.metrics.request(str(error.status), time.perf_counter() - start)
            await self._abort(context, error)
        self.app.predictor.metrics.request("200", time.perf_counter() - start)
        if rid.isascii() and rid.isprintable():  # what gRPC metadata can carry
            context.set_trailing_metadata((("x-request-id", rid),))
        return response

    def _rows(self, request: Any) -> Rows:
        sig = self.app.signature
        protocol.one_input(len(request.inputs), sig)
        tensor = request.inputs[0]
        shape = list(tensor.shape)
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
                raise ProtocolError(
                    f"raw_input_contents: {len(request.raw_input_contents)} tensors; expected "
                    "exactly 1 (the bytes of inputs[0], whose contents must then be empty)"
                )
            return protocol.raw_tensor_rows(
                request.raw_input_contents[0],
                datatype=tensor.datatype,
                shape=shape,
                field="inputs[0]",
                signature=sig,
            )
        protocol.checked_datatype(tensor.datatype, "inputs[0].datatype")
        if tensor.datatype not in GRPC_CONTENTS:  # FP16 has no contents field
            raise ProtocolError(
                f"inputs[0]: {tensor.datatype} values travel only as little-endian bytes in "
                "raw_input_contents"
            )
        key, dtype = GRPC_CONTENTS[tensor.datatype]
        return protocol.tensor_rows(
            np.asarray(getattr(tensor.contents, key), dtype=dtype),
            name=tensor.name,
            datatype=tensor.datatype,
            shape=shape,
            field="inputs[0]",
            data_field=f"inputs[0].contents.{key}",
            signature=sig,
        )

    def _response(self, rid: str, outputs: Rows, *, raw: bool) -> Any:
        sig = self.app.signature
        tensor = self.pb.ModelInferResponse.InferOutputTensor(
            name=sig.output_name, datatype="FP32", shape=list(outputs.shape)
        )
        response = self.pb.ModelInferResponse(
            model_name=sig.model, model_version=sig.version, id=rid
        )
        if raw:
            response.raw_output_contents.append(
                np.ascontiguousarray(outputs, dtype=DATATYPES["FP32"]).tobytes()
            )
        else:
            tensor.contents.fp32_contents.extend(outputs.ravel().tolist())
        response.outputs.append(tensor)
        return response


def _handler(servicer: InferenceServicer) -> Any:
    """A generic handler for the service as kserve's .proto declares it (methods the servicer
    lacks are left out: gRPC answers them UNIMPLEMENTED)."""
    pb = servicer.pb
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name, None)
        if implementation is None:
            continue
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            implementation,
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start_grpc_server(
    app: ServingApp, *, host: str, port: int, max_message_bytes: int
) -> Any:
    """A started ``grpc.aio`` server on ``host:port`` (RuntimeError if it cannot listen)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
        ]
    )
    server.add_generic_rpc_handlers((_handler(InferenceServicer(app)),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise RuntimeError(f"--grpc-port {port}: cannot listen on {host}:{port}: {exc}") from None
    if not bound:
        raise RuntimeError(f"--grpc-port {port}: cannot listen on {host}:{port}")
    await server.start()
    return server
