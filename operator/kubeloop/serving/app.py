"""The serving runtime's HTTP server: a framework-free ASGI app on uvicorn (uvloop, httptools,
orjson); ``launcher.py`` runs it, with the V2 gRPC server (``grpc_server``) on the same
event loop.

It answers KServe's V1 and V2 REST protocols the way kserve's ModelServer does (the rules live
in ``protocol``; ``tests/integration/test_serving_conformance.py`` sends the same corpus to
both), on the routes a KServe InferenceService probes:

    GET  /  /v2/health/live  /v2/health/ready  /v2  /v1/models  /v2/models  /metrics
    GET  /v1/models/{name}  /v2/models/{name}[/versions/{v}][/ready]
    POST /v1/models/{name}:predict  /v2/models/{name}[/versions/{v}]/infer
    POST /v1/models/{name}:feedback  /v2/models/{name}/feedback

Why not FastAPI (kserve's stack): per request it builds a Request, matches routes by regex,
validates with pydantic and, in kserve, logs and times every call twice; here a request costs
a dict lookup, one orjson parse and one orjson dump around the model call. Nothing is logged
per request (the counters in ``/metrics`` are the record); a failing model is logged at most
once a minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import REGISTRY, exposition

from kubeloop.serving import protocol
from kubeloop.serving.predictor import Predictor
from kubeloop.serving.protocol import ProtocolError, Rows, Signature

logger = logging.getLogger("kubeloop.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"
FAILURE_LOG_INTERVAL_S = 60.0


class _ClientGone(Exception):
    """The client disconnected before its body arrived: nobody is left to answer."""


@dataclass
class _Headers:
    """The few request headers the runtime reads."""

    request_id: str | None = None  # X-Request-Id
    ce_id: str | None = None  # Ce-Id (a CloudEvent's id)
    content_length: str | None = None
    binary_header: str | None = None  # Inference-Header-Content-Length
    accept: str = ""

    @classmethod
    def of(cls, scope: Scope) -> _Headers:
        out = cls()
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                out.request_id = value.decode("latin-1")
            elif name == b"ce-id":
                out.ce_id = value.decode("latin-1")
            elif name == b"content-length":
                out.content_length = value.decode("latin-1")
            elif name == b"inference-header-content-length":
                out.binary_header = value.decode("latin-1")
            elif name == b"accept":
                out.accept = value.decode("latin-1")
        return out


class _FailureLog:
    """Logs a model failure with its traceback at most once an interval; counts the rest."""

    def __init__(self, what: str, interval_s: float = FAILURE_LOG_INTERVAL_S) -> None:
        self.what = what
        self.interval_s = interval_s
        self._next_at = 0.0
        self._unlogged = 0

    def log(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._unlogged += 1
            return
        logger.error(
            "%s failed (%d failures not logged since the last line)",
            self.what,
            self._unlogged,
            exc_info=exc,
        )
        self._unlogged, self._next_at = 0, now + self.interval_s


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    request_id: str | None = None,
    content_type: bytes = JSON,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ServingApp:
    """The ASGI app serving one loaded version; the gRPC server shares its state."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES,
        max_batch_rows: int = protocol.DEFAULT_MAX_BATCH_ROWS,
    ) -> None:
        self.predictor = predictor
        self.signature = Signature.of(
            predictor.model, predictor.name, predictor.version, max_batch_rows
        )
        self.max_body_bytes = max_body_bytes
        self.not_ready = ""  # why readiness answers 503 ('' = ready)
        self._failures = _FailureLog(f"model {predictor.name!r} version {predictor.version!r}")
        m, v = predictor.name, predictor.version
        self._static = {
            "/": orjson.dumps({"status": "alive"}),
            "/v2/health/live": orjson.dumps({"live": True}),
            "/v2": orjson.dumps(protocol.server_metadata()),
            "/v1/models": orjson.dumps({"models": [m]}),
            "/v2/models": orjson.dumps({"models": [m]}),
            f"/v2/models/{m}": orjson.dumps(protocol.model_metadata(self.signature)),
            f"/v2/models/{m}/versions/{v}": orjson.dumps(protocol.model_metadata(self.signature)),
        }
        get: dict[str, Handler] = dict.fromkeys(self._static, self._static_route)
        get |= {
            "/v2/health/ready": self._server_ready,
            f"/v1/models/{m}": self._model_ready,
            f"/v2/models/{m}/ready": self._model_ready,
            f"/v2/models/{m}/versions/{v}/ready": self._model_ready,
            "/metrics": self._metrics,
        }
        post: dict[str, Handler] = {
            f"/v1/models/{m}:predict": self._v1_predict,
            f"/v2/models/{m}/infer": self._v2_infer,
            f"/v2/models/{m}/versions/{v}/infer": self._v2_infer,
            f"/v1/models/{m}:feedback": self._feedback,
            f"/v2/models/{m}/feedback": self._feedback,
        }
        self._routes: dict[str, tuple[str, Handler]] = {p: ("GET", h) for p, h in get.items()}
        self._routes |= {p: ("POST", h) for p, h in post.items()}

    # --- state shared with the gRPC server ----------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.not_ready

    def drain(self, reason: str) -> None:
        """Readiness answers 503 with ``reason`` from now on, so traffic is routed elsewhere.
        Predictions still arriving are answered: a 503 would count as an error against the
        version in the canary analysis (which reads 5xx as failures)."""
        self.not_ready = self.not_ready or reason

    def not_ready_error(self) -> ProtocolError:
        return ProtocolError(
            f"Model with name {self.signature.model} is not ready. {self.not_ready}", 503
        )

    async def predict(self, rows: Rows, request_id: str) -> Rows:
        """The model's outputs; ProtocolError(500) when the model itself fails."""
        try:
            return await self.predictor.predict(rows, request_id=request_id)
        except Exception as exc:
            self._failures.log(exc)
            raise protocol.model_failure(exc) from None

    # --- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        path: str = scope["path"]
        route = self._routes.get(path)
        if route is None:
            error = self._unknown_route(scope["method"], path)
            if path.endswith((":predict", "/infer")):
                self.predictor.metrics.request(str(error.status), 0.0)
            await _respond(send, error.status, error.body())
            return
        method, handler = route
        if scope["method"] != method:
            error = ProtocolError(f"{scope['method']} is not allowed on {path}; use {method}", 405)
            await _respond(send, 405, error.body(), extra=((b"allow", method.encode()),))
            return
        try:
            await handler(scope, receive, send)
        except _ClientGone:
            return

    def _unknown_route(self, method: str, path: str) -> ProtocolError:
        sig = self.signature
        name, version = "", ""
        if path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/").split(":", 1)[0]
        elif path.startswith("/v2/models/"):
            parts = path.removeprefix("/v2/models/").split("/")
            name = parts[0]
            if len(parts) >= 3 and parts[1] == "versions":
                version = parts[2]
        if name and name != sig.model:
            return protocol.unknown_model(name, sig)
        if version and version != sig.version:
            return protocol.unknown_version(version, sig)
        return ProtocolError(
            f"no route {method} {path}; this server answers V1 /v1/models/{sig.model}:predict "
            f"and V2 /v2/models/{sig.model}/infer",
            404,
        )

    async def _body(self, receive: Receive, headers: _Headers) -> bytes:
        limit = self.max_body_bytes
        declared = headers.content_length
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # --- routes -------------------------------------------------------------------------

    async def _static_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, self._static[scope["path"]])

    async def _server_ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.not_ready:
            error = ProtocolError(f"Server is not ready. {self.not_ready}", 503)
            await _respond(send, 503, error.body())
            return
        await _respond(send, 200, b'{"ready":true}')

    async def _model_ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.not_ready:
            await _respond(send, 503, self.not_ready_error().body())
            return
        body = orjson.dumps({"name": self.signature.model, "ready": True})
        await _respond(send, 200, body)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        encoder, content_type = exposition.choose_encoder(_Headers.of(scope).accept)
        await _respond(send, 200, encoder(REGISTRY), content_type=content_type.encode())

    async def _v1_predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        headers = _Headers.of(scope)
        rid = protocol.request_id(headers.request_id, headers.ce_id)
        try:
            payload = protocol.decode_json(await self._body(receive, headers))
            rows = protocol.v1_rows(payload, self.signature)
            outputs = await self.predict(rows, rid)
            status, body = 200, protocol.v1_response(outputs, self.signature)
        except ProtocolError as error:
            status, body = error.status, error.body()
        self.predictor.metrics.request(str(status), time.perf_counter() - start)
        await _respond(send, status, body, request_id=rid)

    async def _v2_infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        headers = _Headers.of(scope)
        rid = protocol.request_id(headers.request_id, headers.ce_id)
        content_type = JSON
        extra: tuple[tuple[bytes, bytes], ...] = ()
        try:
            body = await self._body(receive, headers)
            json_part, raw = protocol.split_binary(body, headers.binary_header)
            payload = protocol.decode_json(json_part)
            rid = protocol.body_id(payload) or rid  # errors too carry the client's id
            request = protocol.v2_request(payload, self.signature, raw)
            outputs = await self.predict(request.rows, rid)
            body, header_length = protocol.v2_response(
                rid, outputs, self.signature, binary=request.binary_output
            )
            status = 200
            if header_length is not None:
                content_type = b"application/octet-stream"
                extra = ((protocol.BINARY_HEADER.encode(), b"%d" % header_length),)
        except ProtocolError as error:
            status, body = error.status, error.body()
        self.predictor.metrics.request(str(status), time.perf_counter() - start)
        await _respond(send, status, body, request_id=rid, content_type=content_type, extra=extra)

    async def _feedback(self, scope: Scope, receive: Receive, send: Send) -> None:
        feedback = self.predictor.feedback
        try:
            if feedback is None:
                raise ProtocolError(
                    f"model {self.signature.model!r} takes no feedback: the runtime runs "
                    "without a feedback store (start it with --feedback-ttl > 0)",
                    404,
                )
            payload = protocol.decode_json(await self._body(receive, _Headers.of(scope)))
            status, answer = feedback.submit(payload, time.time())
            body = orjson.dumps(answer)
        except ProtocolError as error:
            status, body = error.status, error.body()
        await _respond(send, status, body)


def _too_large(size: int, limit: int) -> ProtocolError:
    return ProtocolError(
        f"request body of {size} bytes is over the limit of {limit} bytes (--max-body-bytes); "
        "send fewer rows a request",
        413,
    )
