"""The wire protocols' rules (``serving/protocol.py``), the HTTP app called in-process with a
real trained model (routes, request ids, limits, errors, counters, feedback, draining) and the
command line's flags."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from kubeloop.serving import protocol
from kubeloop.serving.__main__ import build_parser, main
from kubeloop.serving.app import ServingApp
from kubeloop.serving.artifact import load_model
from kubeloop.serving.launcher import load_predictor
from kubeloop.serving.predictor import Predictor, ServingOptions
from kubeloop.serving.protocol import ProtocolError, Signature
from kubeloop.serving.samples import breast_cancer_rows, train_tabular_model, write_broken_model

SIG = Signature("m", "m-v1", "classification", ("a", "b", "c"), ("no", "yes"), max_batch_rows=4)
REG = Signature("r", "r-v1", "regression", ("a", "b", "c"))


def error_of(call: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call()
    return info.value


# --- V1 ----------------------------------------------------------------------------------


def test_v1_rows_take_instances_or_inputs_and_integers() -> None:
    rows = protocol.v1_rows({"instances": [[1, 2, 3], [4.5, 5, 6]]}, SIG)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, [[1, 2, 3], [4.5, 5, 6]])
    np.testing.assert_array_equal(protocol.v1_rows({"inputs": [[1, 2, 3]]}, SIG), [[1, 2, 3]])


@pytest.mark.parametrize(
    ("payload", "fragments"),
    [
        ([[1, 2, 3]], ["JSON object", "got a list"]),
        ({"rows": []}, ['"instances" is missing', "['rows']"]),
        ({"instances": {"a": 1}}, ['"instances" must be a list', "got an object"]),
        ({"instances": [[1, 2]]}, ['"instances"', "[1, 2]", "expected [n, 3]", "a, b, c"]),
        ({"instances": []}, ['"instances"', "[0]", "n >= 1"]),
        ({"instances": [1, 2, 3]}, ['"instances"', "[3]", "expected [n, 3]"]),
        ({"instances": [["1", 2, 3]]}, ['"instances" must hold only numbers', '"1"']),
        ({"instances": [[None, 2, 3]]}, ["only numbers", "null"]),
        ({"instances": [[True, False, True]]}, ["only numbers", "true"]),
        ({"instances": [[1, 2, 3], [1, 2]]}, ['"instances" is not a rectangular array']),
        (
            {"instances": [[1, 2, 3]] * 5},
            ['"instances"', "5 rows", "at most 4", "--max-batch-rows"],
        ),
    ],
)
def test_v1_errors_name_the_field_and_what_is_accepted(
    payload: object, fragments: list[str]
) -> None:
    error = error_of(lambda: protocol.v1_rows(payload, SIG))
    assert error.status == 400
    for fragment in fragments:
        assert fragment in error.message, (fragment, error.message)
    assert json.loads(error.body()) == {"error": error.message}


def test_v1_response_prints_float32_values_and_the_version() -> None:
    outputs = np.asarray([[0.1, 0.9]], dtype=np.float32)
    assert (
        protocol.v1_response(outputs, SIG) == b'{"predictions":[[0.1,0.9]],"model_version":"m-v1"}'
    )
    # a slice that is not C-contiguous still encodes
    wide = np.asarray([[0.25, 0.5, 0.75]], dtype=np.float32)[:, ::2]
    assert json.loads(protocol.v1_response(wide, SIG))["predictions"] == [[0.25, 0.75]]


# --- V2 ----------------------------------------------------------------------------------


def tensor(datatype: str = "FP32", data: Any = None, shape: Any = None) -> dict[str, Any]:
    return {
        "name": "x",
        "datatype": datatype,
        "shape": [2, 3] if shape is None else shape,
        "data": [1, 2, 3, 4, 5, 6] if data is None else data,
    }


@pytest.mark.parametrize("datatype", [d for d in protocol.DATATYPES if d != "FP16"])
def test_v2_every_numeric_datatype_becomes_float32_rows(datatype: str) -> None:
    request = protocol.v2_request({"inputs": [tensor(datatype)]}, SIG)
    assert request.rows.dtype == np.float32
    np.testing.assert_array_equal(request.rows, [[1, 2, 3], [4, 5, 6]])
    assert (request.id, request.binary_output) == (None, False)


def test_v2_nested_data_and_ids() -> None:
    request = protocol.v2_request(
        {"id": "r1", "inputs": [tensor(data=[[1, 2, 3], [4, 5, 6]])]}, SIG
    )
    assert request.id == "r1"
    np.testing.assert_array_equal(request.rows, [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize(
    ("payload", "fragments"),
    [
        ([1], ["JSON object", '"inputs"']),
        ({}, ['"inputs" must be a list', "got null"]),
        ({"inputs": []}, ['"inputs"', "exactly 1", "got 0 inputs"]),
        ({"inputs": [tensor(), tensor()]}, ["exactly 1", "got 2 inputs"]),
        ({"inputs": [7]}, ["inputs[0] must be an object"]),
        ({"inputs": [{"name": "x", "shape": [1, 3]}]}, ["inputs[0].datatype is missing"]),
        ({"inputs": [{**tensor(), "name": 3}]}, ["inputs[0].name must be a string"]),
        ({"inputs": [{k: v for k, v in tensor().items() if k != "data"}]},
         ["inputs[0].data is missing"]),
        ({"inputs": [tensor("BYTES")]}, ["inputs[0].datatype", '"BYTES"', "FP32"]),
        ({"inputs": [tensor("BOOL")]}, ["inputs[0].datatype", '"BOOL"']),
        ({"inputs": [tensor("FP16")]}, ["FP16 data via JSON is not supported", "input x"]),
        ({"inputs": [tensor(shape="2x3")]}, ["inputs[0].shape", '"2x3"']),
        ({"inputs": [tensor(shape=[2, -3])]}, ["inputs[0].shape", "[2,-3]"]),
        ({"inputs": [tensor(shape=[3, 3])]}, ["inputs[0].data holds 6 values", "[3, 3]", "9"]),
        ({"inputs": [tensor(shape=[6])]}, ["inputs[0]: input has shape [6]", "[n, 3]"]),
        ({"inputs": [tensor(data=["1"] * 6)]}, ["inputs[0].data must hold only numbers", '"1"']),
        ({"inputs": [tensor("INT8", [1, 2, 3, 4, 5, 300])]}, ["300", "INT8", "[-128, 127]"]),
        ({"inputs": [tensor("UINT8", [-1, 2, 3, 4, 5, 6])]}, ["-1", "UINT8", "[0, 255]"]),
        ({"inputs": [tensor("INT32", [1.5, 2, 3, 4, 5, 6])]}, ["INT32 holds integers", "1.5"]),
        ({"inputs": [tensor(data=[2**70] * 6)]}, ["only numbers", "beyond 64 bits"]),
        ({"id": 5, "inputs": [tensor()]}, ['"id" must be a string', "got 5"]),
        ({"id": "a\nb", "inputs": [tensor()]}, ['"id"', "printable"]),
        ({"inputs": [tensor()], "parameters": [1]}, ['"parameters" must be an object']),
        ({"inputs": [tensor()], "parameters": {"binary_data_output": 1}}, ["true or false"]),
        ({"inputs": [tensor()], "outputs": "probabilities"}, ['"outputs" must be a list']),
        ({"inputs": [tensor()], "outputs": [{"name": "p"}]},
         ["outputs[0].name", '"p"', "'probabilities'"]),
        ({"inputs": [tensor(data=[[1, 2, 3]] * 5, shape=[5, 3])]}, ["5 rows", "at most 4"]),
    ],
)  # fmt: skip
def test_v2_errors_name_the_field_and_what_is_accepted(
    payload: object, fragments: list[str]
) -> None:
    error = error_of(lambda: protocol.v2_request(payload, SIG))
    assert error.status == 400
    for fragment in fragments:
        assert fragment in error.message, (fragment, error.message)


def test_v2_binary_extension_in_and_out() -> None:
    values = np.asarray([[1, 2, 3], [4, 5, 6]], dtype="<f2")
    raw = values.tobytes()
    header = {"inputs": [{"name": "x", "datatype": "FP16", "shape": [2, 3],
                          "parameters": {"binary_data_size": len(raw)}}]}  # fmt: skip
    body = json.dumps(header).encode()
    json_part, tail = protocol.split_binary(body + raw, str(len(body)))
    assert (json_part, tail) == (body, raw)
    request = protocol.v2_request(json.loads(json_part), SIG, tail)
    np.testing.assert_array_equal(request.rows, values.astype(np.float32))

    too_short = {**header["inputs"][0], "parameters": {"binary_data_size": 4}}
    error = error_of(lambda: protocol.v2_request({"inputs": [too_short]}, SIG, raw))
    assert "4 bytes of raw data" in error.message
    assert "needs 12" in error.message
    error = error_of(lambda: protocol.split_binary(b"{}", "9"))
    assert protocol.BINARY_HEADER in error.message

    outputs = np.asarray([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    out, length = protocol.v2_response("r", outputs, SIG, binary=True)
    assert length is not None
    head = json.loads(out[:length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert "data" not in head["outputs"][0]
    np.testing.assert_array_equal(np.frombuffer(out[length:], dtype="<f4").reshape(2, 2), outputs)


def test_v2_binary_output_flags() -> None:
    base = {"inputs": [tensor()]}
    assert not protocol.v2_request(base, SIG).binary_output
    on = {**base, "parameters": {"binary_data_output": True}}
    assert protocol.v2_request(on, SIG).binary_output
    # each requested output may override the request's default
    off = {**on, "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}
    assert not protocol.v2_request(off, SIG).binary_output
    listed = {**on, "outputs": [{"name": "probabilities"}]}
    assert protocol.v2_request(listed, SIG).binary_output


def test_v2_response_names_the_output_by_task() -> None:
    out, length = protocol.v2_response("id-1", np.asarray([[0.5, 0.5]], np.float32), SIG)
    assert length is None
    assert json.loads(out) == {
        "id": "id-1", "model_name": "m", "model_version": "m-v1",
        "outputs": [{"name": "probabilities", "shape": [1, 2], "datatype": "FP32",
                     "data": [0.5, 0.5]}],
    }  # fmt: skip
    out, _ = protocol.v2_response("id-2", np.asarray([1.5, 2.5], np.float32), REG)
    assert json.loads(out)["outputs"] == [
        {"name": "predictions", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}
    ]


def test_metadata_describes_the_signature() -> None:
    assert protocol.model_metadata(SIG) == {
        "name": "m", "versions": ["m-v1"], "platform": "",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
    }  # fmt: skip
    assert protocol.output_metadata(REG) == [
        {"name": "predictions", "datatype": "FP32", "shape": [-1]}
    ]
    assert protocol.server_metadata()["name"] == "kubeloop"


def test_request_id_takes_the_first_given_else_a_uuid4() -> None:
    assert protocol.request_id("body", "header", "ce") == "body"
    assert protocol.request_id(None, "", "ce") == "ce"
    generated = protocol.request_id(None, None)
    assert uuid.UUID(generated).version == 4
    assert generated != protocol.request_id(None, None)
    assert protocol.body_id({"id": "x"}) == "x"
    assert protocol.body_id({"id": 3}) is None
    assert protocol.body_id(["id"]) is None


def test_malformed_json_is_a_400() -> None:
    error = error_of(lambda: protocol.decode_json(b'{"instances": [1,'))
    assert error.status == 400
    assert error.message.startswith("request body is not valid JSON: ")


# --- the HTTP app, in-process ------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tabular_model(tmp_path_factory.mktemp("tabular"))


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Client:
    app: ServingApp
    received: list[int] = field(default_factory=list)  # receive() calls of the last request

    async def __call__(
        self,
        method: str,
        path: str,
        body: bytes | Any = b"",
        headers: dict[str, str] | None = None,
        *,
        chunks: int = 1,
        length: bool = True,
    ) -> Answer | None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        size = max(-(-len(raw) // chunks), 1)
        pieces = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
        head = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        if length:
            head.append((b"content-length", str(len(raw)).encode()))
        scope = {"type": "http", "method": method, "path": path, "headers": head}
        self.received.clear()
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            self.received.append(1)
            if not pieces:
                return {"type": "http.disconnect"}
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        if not sent:
            return None
        start, content = sent
        return Answer(start["status"], dict(start["headers"]), content["body"])


Call = Callable[..., Awaitable[Answer | None]]


async def ok(client: Call, *args: Any, **kwargs: Any) -> Answer:
    answer = await client(*args, **kwargs)
    assert answer is not None
    return answer


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return load_predictor("cancer", "cancer-v1", model_dir, ServingOptions())


@pytest.fixture
def client(predictor: Predictor) -> Client:
    return Client(ServingApp(predictor, max_body_bytes=20_000, max_batch_rows=16))


def requests_total(code: str, model: str = "cancer", version: str = "cancer-v1") -> float:
    value = REGISTRY.get_sample_value(
        "kubeloop_requests_total", {"model": model, "version": version, "code": code}
    )
    return value or 0.0


ROWS = breast_cancer_rows(3, offset=7)


async def test_predictions_match_the_model_and_carry_the_request_id(
    client: Client, model_dir: Path
) -> None:
    want = load_model(model_dir).predict(np.asarray(ROWS, dtype=np.float32))
    v1 = await ok(client, "POST", "/v1/models/cancer:predict", {"instances": ROWS})
    assert v1.status == 200
    assert v1.headers[b"content-type"] == b"application/json"
    np.testing.assert_allclose(v1.json()["predictions"], want, rtol=1e-6)
    assert uuid.UUID(v1.headers[b"x-request-id"].decode()).version == 4

    body = {"inputs": [{"name": "x", "shape": [3, 30], "datatype": "FP32", "data": ROWS}]}
    v2 = await ok(client, "POST", "/v2/models/cancer/infer", body, {"X-Request-Id": "hdr"})
    assert v2.json()["id"] == "hdr" == v2.headers[b"x-request-id"].decode()
    v2 = await ok(client, "POST", "/v2/models/cancer/infer", {**body, "id": "own"},
                  {"X-Request-Id": "hdr"})  # fmt: skip
    assert v2.json()["id"] == "own" == v2.headers[b"x-request-id"].decode()
    v2 = await ok(client, "POST", "/v2/models/cancer/infer", body, {"Ce-Id": "event-1"})
    assert v2.json()["id"] == "event-1"
    versioned = await ok(client, "POST", "/v2/models/cancer/versions/cancer-v1/infer", body)
    np.testing.assert_allclose(
        np.reshape(versioned.json()["outputs"][0]["data"], (3, 2)), want, rtol=1e-6
    )


async def test_errors_carry_the_request_id_and_are_counted(client: Client) -> None:
    before = {code: requests_total(code) for code in ("200", "400", "404", "413")}
    bad = await ok(client, "POST", "/v1/models/cancer:predict", {"instances": [[1.0]]},
                   {"X-Request-Id": "r-9"})  # fmt: skip
    assert (bad.status, bad.headers[b"x-request-id"]) == (400, b"r-9")
    assert "expected [n, 30]" in bad.json()["error"]
    bad_v2 = await ok(client, "POST", "/v2/models/cancer/infer", {"id": "mine", "inputs": []})
    assert (bad_v2.status, bad_v2.headers[b"x-request-id"]) == (400, b"mine")
    other = await ok(client, "POST", "/v2/models/other/infer", {"inputs": []})
    assert other.status == 404
    assert other.json()["error"] == (
        "Model with name other does not exist. This server serves 'cancer'."
    )
    big = await ok(client, "POST", "/v1/models/cancer:predict",
                   {"instances": breast_cancer_rows(60)})  # fmt: skip
    assert big.status == 413
    assert "--max-body-bytes" in big.json()["error"]
    assert client.received == []  # refused by its Content-Length, never read
    rows = await ok(client, "POST", "/v1/models/cancer:predict",
                    {"instances": breast_cancer_rows(17)})  # fmt: skip
    assert rows.status == 400
    assert "17 rows" in rows.json()["error"]
    after = {code: requests_total(code) for code in before}
    assert {code: after[code] - before[code] for code in before} == {
        "200": 0, "400": 3, "404": 1, "413": 1,
    }  # fmt: skip


async def test_bodies_are_limited_while_they_stream(client: Client) -> None:
    body = json.dumps({"instances": breast_cancer_rows(60)}).encode()
    answer = await ok(client, "POST", "/v1/models/cancer:predict", body, chunks=8, length=False)
    assert answer.status == 413
    assert 1 < len(client.received) < 8  # stopped reading once over the limit
    small = json.dumps({"instances": ROWS}).encode()
    answer = await ok(client, "POST", "/v1/models/cancer:predict", small, chunks=3, length=False)
    assert answer.status == 200


async def test_a_client_gone_before_its_body_gets_no_answer(client: Client) -> None:
    empty = await ok(client, "POST", "/v1/models/cancer:predict", b"", length=False)
    assert empty.status == 400  # an empty body is answerable
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/models/cancer:predict", "headers": []}
    await client.app(scope, receive, send)
    assert sent == []


async def test_routes_health_metadata_and_methods(client: Client) -> None:
    expected = {
        "/": {"status": "alive"},
        "/v2/health/live": {"live": True},
        "/v2/health/ready": {"ready": True},
        "/v2/models/cancer/ready": {"name": "cancer", "ready": True},
        "/v2/models/cancer/versions/cancer-v1/ready": {"name": "cancer", "ready": True},
        "/v1/models/cancer": {"name": "cancer", "ready": True},
        "/v1/models": {"models": ["cancer"]},
        "/v2/models": {"models": ["cancer"]},
    }
    for path, body in expected.items():
        answer = await ok(client, "GET", path)
        assert (answer.status, answer.json()) == (200, body), path
    metadata = (await ok(client, "GET", "/v2/models/cancer")).json()
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
    assert metadata["versions"] == ["cancer-v1"]
    wrong = await ok(client, "GET", "/v1/models/cancer:predict")
    assert (wrong.status, wrong.headers[b"allow"]) == (405, b"POST")
    assert "GET is not allowed" in wrong.json()["error"]
    missing = await ok(client, "GET", "/v2/models/cancer/versions/v7")
    assert missing.status == 404
    assert "no version 'v7'" in missing.json()["error"]
    nowhere = await ok(client, "GET", "/v3")
    assert nowhere.status == 404
    assert "/v2/models/cancer/infer" in nowhere.json()["error"]
    metrics = await ok(client, "GET", "/metrics")
    assert metrics.status == 200
    assert metrics.headers[b"content-type"].startswith(b"text/plain")
    assert b'kubeloop_requests_total{code="200",model="cancer",version="cancer-v1"}' in (
        metrics.body
    )


async def test_draining_turns_readiness_503_and_still_answers(predictor: Predictor) -> None:
    client = Client(ServingApp(predictor))
    client.app.drain("The server is shutting down.")
    ready = await ok(client, "GET", "/v2/health/ready")
    assert ready.status == 503
    assert ready.json()["error"] == "Server is not ready. The server is shutting down."
    model = await ok(client, "GET", "/v1/models/cancer")
    assert model.status == 503
    assert "Model with name cancer is not ready." in model.json()["error"]
    # requests already on their way are answered (a 503 would count against the version)
    predict = await ok(client, "POST", "/v1/models/cancer:predict", {"instances": ROWS})
    assert predict.status == 200
    assert not client.app.ready


@dataclass
class Labels:
    """A feedback store stand-in that keeps what it was given (the store is another module)."""

    calls: list[tuple[object, float]] = field(default_factory=list)

    def submit(self, payload: object, at: float) -> tuple[int, dict[str, object]]:
        self.calls.append((payload, at))
        return 409, {"status": "conflict"}


async def test_feedback_is_delegated_or_404_without_a_store(model_dir: Path) -> None:
    bare = Predictor.load("fb", "fb-v1", model_dir, ServingOptions())  # no recorders attached
    client = Client(ServingApp(bare))
    for path in ("/v2/models/fb/feedback", "/v1/models/fb:feedback"):
        answer = await ok(client, "POST", path, {"id": "x", "label": 1})
        assert answer.status == 404
        assert "takes no feedback" in answer.json()["error"]
    labels = Labels()
    bare.feedback = labels
    answer = await ok(client, "POST", "/v2/models/fb/feedback", {"id": "x", "label": 1})
    assert (answer.status, answer.json()) == (409, {"status": "conflict"})
    [(payload, at)] = labels.calls
    assert payload == {"id": "x", "label": 1}
    assert at > 1e9  # wall-clock seconds
    broken = await ok(client, "POST", "/v1/models/fb:feedback", b"{nope")
    assert broken.status == 400
    assert "not valid JSON" in broken.json()["error"]
    assert len(labels.calls) == 1


async def test_a_failing_model_is_a_500_logged_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Predictor.load("broken", "broken-v1", write_broken_model(tmp_path), ServingOptions())
    client = Client(ServingApp(broken))
    before = requests_total("500", "broken", "broken-v1")
    with caplog.at_level(logging.ERROR, logger="kubeloop.serving"):
        for _ in range(3):
            answer = await ok(client, "POST", "/v1/models/broken:predict", {"instances": ROWS})
            assert answer.status == 500
            # kserve's wording: the exception's type and message (torch's guard, here)
            assert answer.json()["error"].startswith("AssertionError : Guard failed")
    assert requests_total("500", "broken", "broken-v1") - before == 3
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None


# --- the command line --------------------------------------------------------------------

REQUIRED = ["--model-dir", "d", "--model-name", "n", "--model-version", "v", "--http-port", "1"]


def test_flags_cover_every_serving_option() -> None:
    args = build_parser().parse_args(
        [*REQUIRED, "--device", "cuda", "--feedback-ttl", "60", "--request-log-uri", "s3://b/p",
         "--request-log-sample", "0.25", "--request-log-max-rows", "1000",
         "--request-log-flush-interval", "2.5",
         "--prediction-edges", "[0.1, 0.5, 2]", "--grpc-port", "8081", "--max-body-bytes", "9",
         "--max-batch-rows", "3", "--max-batch-size", "8", "--max-latency-ms", "2",
         "--cache-size", "10", "--cache-ttl", "5"]
    )  # fmt: skip
    assert args.prediction_edges == (0.1, 0.5, 2.0)
    assert (args.device, args.feedback_ttl, args.request_log_uri) == ("cuda", 60.0, "s3://b/p")
    assert (args.request_log_sample, args.request_log_max_rows) == (0.25, 1000)
    assert args.request_log_flush_interval == 2.5
    assert (args.grpc_port, args.max_body_bytes, args.max_batch_rows) == (8081, 9, 3)
    assert args.server == "kubeloop"
    defaults = build_parser().parse_args(REQUIRED)
    assert (defaults.feedback_ttl, defaults.prediction_edges, defaults.grpc_port) == (
        ServingOptions().feedback_ttl_s, (), None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--prediction-edges", "[1, 0.5]"], "increasing numbers"),
        (["--prediction-edges", "0.5"], "JSON list"),
        (["--request-log-sample", "1.5"], "between 0 and 1"),
        (["--feedback-ttl", "0"], "> 0"),
        (["--max-batch-rows", "0"], ">= 1"),
        (["--workers", "2"], "--server kserve"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    flags: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*REQUIRED, *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flags[0] in err, err
    assert reason in err, err


def test_an_option_the_recorders_refuse_exits_2_with_one_line(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([*REQUIRED[:1], str(model_dir), *REQUIRED[2:], "--request-log-uri",
                 "nosuchscheme://bucket/prefix"])  # fmt: skip
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("kubeloop.serving: "), lines
    assert "nosuchscheme" in lines[-1]
