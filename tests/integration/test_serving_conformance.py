"""Conformance, side by side: kserve's ModelServer (``--server kserve``, the protocol reference)
and the runtime's own app serve the same trained artifact, and one corpus of requests goes to
both. Status codes and bodies (modulo generated ids, and numbers compared as float32) must
match, or differ exactly as :data:`DIFFERENCES` pins (the table the README shows). Then the
same for a regression model, and gRPC V2 against kserve's gRPC server. No cluster needed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np
import pytest
import torch

from kubeloop.contract.reference import reference_from_data
from kubeloop.serving.artifact import load_model, save_model
from kubeloop.serving.grpc_server import stubs
from kubeloop.serving.protocol import DATATYPES, GRPC_CONTENTS
from kubeloop.serving.samples import breast_cancer, breast_cancer_rows, mlp, train_tabular_model
from tests.integration.test_serving_runtime import (
    MODEL,
    VERSION,
    Server,
    free_port,
    metric_samples,
    start_server,
    stop_server,
    value,
)

MAX_BATCH_ROWS = 64
MAX_BODY_BYTES = 65_536
LIMITS = ("--max-batch-rows", str(MAX_BATCH_ROWS), "--max-body-bytes", str(MAX_BODY_BYTES))
ROWS = breast_cancer_rows(3, offset=40)
FLAT = [v for row in ROWS for v in row]
GIVEN_ID = "req-42"


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: Any = None  # JSON-encoded unless bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes | None:
        if self.body is None or isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


@dataclass(frozen=True)
class Difference:
    kserve: int  # kserve's status code
    ours: int  # the runtime's
    why: str


def v2(datatype: str = "FP32", data: Any = None, shape: Any = None, **extra: Any) -> dict[str, Any]:
    tensor = {
        "name": "x",
        "shape": [3, 30] if shape is None else shape,
        "datatype": datatype,
        "data": FLAT if data is None else data,
    }
    return {"inputs": [tensor], **extra}


def binary_case(name: str, datatype: str, rows: np.ndarray[Any, Any], size: int = -1) -> Case:
    """A V2 request in the binary tensor extension: a JSON header, then the raw tensor."""
    raw = np.ascontiguousarray(rows).tobytes()
    tensor = {
        "name": "x",
        "shape": list(rows.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw) if size < 0 else size},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
    return Case(name, "POST", INFER, header + raw, headers)


INFER = f"/v2/models/{MODEL}/infer"
PREDICT = f"/v1/models/{MODEL}:predict"
_X = np.asarray(ROWS, dtype=np.float64)
SMALL = np.clip(np.round(_X), 0, 100)  # integers every integer datatype can hold


CORPUS: list[Case] = [
    # health, readiness and metadata
    Case("live", "GET", "/"),
    Case("v2 live", "GET", "/v2/health/live"),
    Case("v2 ready", "GET", "/v2/health/ready"),
    Case("v2 model ready", "GET", f"/v2/models/{MODEL}/ready"),
    Case("v1 model ready", "GET", f"/v1/models/{MODEL}"),
    Case("v1 model list", "GET", "/v1/models"),
    Case("v2 model list", "GET", "/v2/models"),
    Case("server metadata", "GET", "/v2"),
    Case("model metadata", "GET", f"/v2/models/{MODEL}"),
    # valid V1
    Case("v1 several rows", "POST", PREDICT, {"instances": ROWS}),
    Case("v1 inputs key", "POST", PREDICT, {"inputs": ROWS}),
    Case("v1 one row", "POST", PREDICT, {"instances": ROWS[:1]}),
    Case("v1 integers", "POST", PREDICT, {"instances": SMALL.astype(int).tolist()}),
    Case("v1 text/plain", "POST", PREDICT, json.dumps({"instances": ROWS}).encode(),
         {"content-type": "text/plain"}),
    Case("v1 x-request-id", "POST", PREDICT, {"instances": ROWS}, {"x-request-id": GIVEN_ID}),
    Case("v1 ce-id", "POST", PREDICT, {"instances": ROWS}, {"ce-id": GIVEN_ID}),
    Case("v1 binary cloudevent", "POST", PREDICT, {"instances": ROWS},
         {"ce-specversion": "1.0", "ce-source": "tests", "ce-type": "predict", "ce-id": GIVEN_ID}),
    Case("v1 structured cloudevent", "POST", PREDICT,
         {"specversion": "1.0", "source": "tests", "type": "predict", "id": GIVEN_ID,
          "data": {"instances": ROWS}},
         {"content-type": "application/cloudevents+json"}),
    Case("v1 max batch rows", "POST", PREDICT,
         {"instances": breast_cancer_rows(MAX_BATCH_ROWS)}),
    # valid V2: every numeric datatype the signature allows, ids, parameters, outputs
    Case("v2 fp32 flat", "POST", INFER, v2()),
    Case("v2 fp32 nested", "POST", INFER, v2(data=ROWS)),
    Case("v2 fp64", "POST", INFER, v2("FP64")),
    *(
        Case(f"v2 {dt.lower()}", "POST", INFER, v2(dt, SMALL.astype(int).ravel().tolist()))
        for dt in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
    ),
    Case("v2 integral floats as int32", "POST", INFER, v2("INT32", SMALL.ravel().tolist())),
    Case("v2 id", "POST", INFER, v2(id=GIVEN_ID)),
    Case("v2 id over header", "POST", INFER, v2(id=GIVEN_ID), {"x-request-id": "other"}),
    Case("v2 x-request-id", "POST", INFER, v2(), {"x-request-id": GIVEN_ID}),
    Case("v2 ce-id", "POST", INFER, v2(), {"ce-id": GIVEN_ID}),
    Case("v2 parameters", "POST", INFER, v2(parameters={"priority": 1, "tag": "a"})),
    Case("v2 requested output", "POST", INFER, v2(outputs=[{"name": "probabilities"}])),
    Case("v2 binary output", "POST", INFER,
         v2(outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])),
    Case("v2 binary_data_output", "POST", INFER, v2(parameters={"binary_data_output": True})),
    Case("v2 binary_data_output with outputs", "POST", INFER,
         v2(parameters={"binary_data_output": True}, outputs=[{"name": "probabilities"}])),
    binary_case("v2 binary fp32", "FP32", _X.astype("<f4")),
    binary_case("v2 binary fp16", "FP16", SMALL.astype("<f2")),
    binary_case("v2 binary int16", "INT16", SMALL.astype("<i2")),
    # malformed JSON and bodies of the wrong kind
    Case("v1 malformed json", "POST", PREDICT, b'{"instances": [[1, 2'),
    Case("v2 malformed json", "POST", INFER, b'{"inputs": [{"name"'),
    Case("v1 body not an object", "POST", PREDICT, [[1.0] * 30]),
    Case("v2 body not an object", "POST", INFER, [1, 2]),
    # no inputs
    Case("v1 no instances", "POST", PREDICT, {"rows": ROWS}),
    Case("v1 empty instances", "POST", PREDICT, {"instances": []}),
    Case("v1 instances not a list", "POST", PREDICT, {"instances": {"a": 1}}),
    Case("v2 no inputs key", "POST", INFER, {"id": "a"}),
    Case("v2 empty inputs", "POST", INFER, {"inputs": []}),
    Case("v2 inputs not a list", "POST", INFER, {"inputs": {"name": "x"}}),
    Case("v2 two inputs", "POST", INFER, {"inputs": v2()["inputs"] * 2}),
    Case("v2 no data", "POST", INFER,
         {"inputs": [{"name": "x", "shape": [3, 30], "datatype": "FP32"}]}),
    # wrong shape
    Case("v1 wrong row width", "POST", PREDICT, {"instances": [[1.0, 2.0]]}),
    Case("v1 ragged rows", "POST", PREDICT, {"instances": [ROWS[0], ROWS[1][:10]]}),
    Case("v1 flat row", "POST", PREDICT, {"instances": ROWS[0]}),
    Case("v2 wrong width", "POST", INFER, v2(data=[1.0, 2.0, 3.0], shape=[1, 3])),
    Case("v2 shape and data disagree", "POST", INFER, v2(shape=[2, 30])),
    Case("v2 one-dimensional", "POST", INFER, v2(data=ROWS[0], shape=[30])),
    Case("v2 three-dimensional", "POST", INFER, v2(shape=[1, 3, 30])),
    Case("v2 shape not a list", "POST", INFER, v2(shape="3x30")),
    Case("v2 negative shape", "POST", INFER, v2(shape=[-3, -30])),
    Case("v2 ragged data", "POST", INFER, v2(data=[ROWS[0], ROWS[1][:10]])),
    binary_case("v2 binary size disagrees", "FP32", _X.astype("<f4"), size=100),
    # wrong datatype
    Case("v1 strings", "POST", PREDICT, {"instances": [["a"] * 30]}),
    Case("v1 nulls", "POST", PREDICT, {"instances": [[None] * 30]}),
    Case("v1 booleans", "POST", PREDICT, {"instances": [[True] * 30]}),
    Case("v2 bytes datatype", "POST", INFER, v2("BYTES", ["a"] * 90)),
    Case("v2 bool datatype", "POST", INFER, v2("BOOL", [True] * 90)),
    Case("v2 unknown datatype", "POST", INFER, v2("FP33")),
    Case("v2 fp16 in json", "POST", INFER, v2("FP16")),
    Case("v2 strings in fp32", "POST", INFER, v2(data=["1.5"] * 90)),
    Case("v2 fractions in int32", "POST", INFER, v2("INT32")),
    Case("v2 int8 overflow", "POST", INFER, v2("INT8", [300] * 90)),
    Case("v2 uint8 negative", "POST", INFER, v2("UINT8", [-1] * 90)),
    Case("v2 id not a string", "POST", INFER, v2(id=7)),
    Case("v2 unknown output", "POST", INFER, v2(outputs=[{"name": "logits"}])),
    # unknown model, versions, routes
    Case("v1 unknown model", "POST", "/v1/models/other:predict", {"instances": ROWS}),
    Case("v2 unknown model", "POST", "/v2/models/other/infer", v2()),
    Case("v2 unknown model ready", "GET", "/v2/models/other/ready"),
    Case("v1 unknown model ready", "GET", "/v1/models/other"),
    Case("v2 unknown model metadata", "GET", "/v2/models/other"),
    Case("v2 versioned infer", "POST", f"/v2/models/{MODEL}/versions/{VERSION}/infer", v2()),
    Case("v2 other version", "POST", f"/v2/models/{MODEL}/versions/v9/infer", v2()),
    Case("unknown route", "GET", "/v3/models"),
    Case("wrong method", "POST", "/v2/health/ready", {}),
    Case("feedback", "POST", f"/v2/models/{MODEL}/feedback",
         {"id": GIVEN_ID, "row": 0, "label": "benign"}),
    # oversized
    Case("v1 oversized batch", "POST", PREDICT,
         {"instances": breast_cancer_rows(MAX_BATCH_ROWS + 1)}),
    Case("v2 oversized batch", "POST", INFER,
         v2(data=breast_cancer_rows(MAX_BATCH_ROWS + 1), shape=[MAX_BATCH_ROWS + 1, 30])),
    Case("v1 oversized body", "POST", PREDICT, {"instances": breast_cancer_rows(200)}),
]  # fmt: skip

# Where the runtime answers differently from kserve's ModelServer, on purpose. Everything else
# in the corpus answers the same status and body. Also, and not per case: V2 JSON numbers are
# the shortest float32 form (0.1) where kserve prints the float64 expansion of the same float32
# (0.10000000149011612); absent "parameters" are left out where kserve writes null; every
# prediction response, errors too, carries X-Request-Id (kserve: answers only).
DIFFERENCES: dict[str, Difference] = {
    "server metadata": Difference(
        200, 200, 'names the server "kubeloop" and its version, no repository extension'
    ),
    "model metadata": Difference(200, 200, '"versions" lists the served ModelVersion, not null'),
    "v1 malformed json": Difference(
        400, 400, '"request body is not valid JSON: …", not "Unrecognized request format: …"'
    ),
    "v2 malformed json": Difference(422, 400, 'kserve answers FastAPI\'s {"detail": [...]}'),
    "v1 instances not a list": Difference(
        400, 400, "kserve's own check answers first: 'Expected \"instances\" to be a list'"
    ),
    "v2 no inputs key": Difference(422, 400, "kserve's pydantic schema answers 422 {detail}"),
    "v2 inputs not a list": Difference(422, 400, "kserve's pydantic schema answers 422 {detail}"),
    "v2 no data": Difference(422, 400, "kserve's pydantic schema answers 422 {detail}"),
    "v2 shape not a list": Difference(422, 400, "kserve's pydantic schema answers 422 {detail}"),
    "v2 id not a string": Difference(422, 400, "kserve's pydantic schema answers 422 {detail}"),
    "v2 body not an object": Difference(422, 400, "kserve's pydantic schema answers 422 {detail}"),
    "v2 binary size disagrees": Difference(
        500, 400, "kserve fails reshaping the raw bytes (500); ours names the sizes"
    ),
    "v2 binary_data_output with outputs": Difference(
        200, 200, "binary_data_output is every output's default (JSON from kserve once outputs "
        "are listed)"
    ),
    "v1 unknown model": Difference(404, 404, "the message also names the served model"),
    "v2 unknown model": Difference(404, 404, "the message also names the served model"),
    "v2 unknown model ready": Difference(404, 404, "the message also names the served model"),
    "v1 unknown model ready": Difference(404, 404, "the message also names the served model"),
    "v2 unknown model metadata": Difference(404, 404, "the message also names the served model"),
    "v2 versioned infer": Difference(501, 200, "versioned routes serve the served version"),
    "v2 other version": Difference(501, 404, "another version is not served here"),
    "unknown route": Difference(404, 404, '{"error": names the routes}, not {"detail"}'),
    "wrong method": Difference(405, 405, '{"error": names the method}, not {"detail"}'),
    "feedback": Difference(404, 200, "a route of ours (labels joined by request id); kserve "
                           "has none"),
    "v1 oversized body": Difference(
        400, 413, "bodies over --max-body-bytes are refused before they are read"
    ),
}  # fmt: skip


@dataclass
class Answer:
    status: int
    body: Any  # parsed JSON, or (JSON header, float32 values) for binary responses
    request_id: str | None


def send(url: str, case: Case) -> Answer:
    headers = {"content-type": "application/json", **case.headers}
    request = urllib.request.Request(
        url + case.path, data=case.encoded(), method=case.method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), exc.headers
    header_length = got.get("inference-header-content-length")
    body: Any
    if header_length is not None:
        n = int(header_length)
        body = (json.loads(raw[:n]), np.frombuffer(raw[n:], dtype="<f4").tolist())
    else:
        body = json.loads(raw)
    return Answer(status, body, got.get("x-request-id"))


def normalised(answer: Answer, case: Case) -> Any:
    """The body with generated ids replaced and every float as float32."""

    def walk(value: Any) -> Any:
        if isinstance(value, float):
            return float(np.float32(value))
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        if isinstance(value, dict):  # kserve writes absent parameters as null
            return {k: walk(v) for k, v in value.items() if (k, v) != ("parameters", None)}
        return value

    body = walk(answer.body)
    header = body[0] if isinstance(body, list) and body and isinstance(body[0], dict) else body
    if isinstance(header, dict) and "id" in header and "outputs" in header:
        header["id"] = expected_id(case) or ("<uuid4>" if _is_uuid(header["id"]) else header["id"])
    return body


def expected_id(case: Case) -> str | None:
    """The request id the client gave: a V2 body's ``id``, else X-Request-Id, else Ce-Id."""
    v2_body = isinstance(case.body, dict) and case.path.endswith("/infer")
    body_id = case.body.get("id") if v2_body else None
    if not isinstance(body_id, str):
        body_id = None
    return body_id or case.headers.get("x-request-id") or case.headers.get("ce-id")


def _is_uuid(value: object) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tabular_model(tmp_path_factory.mktemp("classifier"))


def train_regression_model(directory: Path, *, epochs: int = 30) -> Path:
    """A real regression MLP: the breast-cancer features → the mean area (standardised)."""
    torch.manual_seed(0)
    x, _, names = breast_cancer()
    target = x[:, 3].copy()
    mean, scale = x.mean(axis=0), x.std(axis=0)
    xs = torch.from_numpy((x - mean) / scale)
    ys = torch.from_numpy((target - target.mean()) / target.std())
    model = mlp(x.shape[1], 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.MSELoss()
    for _ in range(epochs):
        optimiser.zero_grad()
        loss_fn(model(xs).squeeze(1), ys).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        predictions = model(xs).squeeze(1).numpy()
    return save_model(
        directory, model, task="regression", features=names, mean=mean.tolist(),
        scale=scale.tolist(),
        reference=reference_from_data(x, names, predictions, task="regression"),
    )  # fmt: skip


@dataclass
class Pair:
    kserve: Server
    ours: Server
    kserve_grpc: int
    ours_grpc: int


def start_pair(model_dir: Path, logs: Path) -> Pair:
    grpc_ports = free_port(), free_port()
    kserve = start_server(
        model_dir, logs / "kserve.log", "--server", "kserve", "--grpc-port", str(grpc_ports[0]),
        *LIMITS,
    )  # fmt: skip
    try:
        ours = start_server(
            model_dir, logs / "ours.log", "--grpc-port", str(grpc_ports[1]), *LIMITS
        )
    except BaseException:
        stop_server(kserve)
        raise
    return Pair(kserve, ours, *grpc_ports)


@pytest.fixture(scope="module")
def pair(classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    servers = start_pair(classifier_dir, tmp_path_factory.mktemp("logs"))
    try:
        yield servers
    finally:
        stop_server(servers.ours)
        stop_server(servers.kserve)


def compare(pair: Pair, corpus: list[Case]) -> list[str]:
    """Every way in which the two servers' answers break the conformance rules."""
    problems: list[str] = []
    for case in corpus:
        theirs, ours = send(pair.kserve.url, case), send(pair.ours.url, case)
        pinned = DIFFERENCES.get(case.name)
        if pinned is None:
            if (theirs.status, normalised(theirs, case)) != (ours.status, normalised(ours, case)):
                problems.append(
                    f"{case.name}: kserve {theirs.status} {theirs.body!r:.300} != ours "
                    f"{ours.status} {ours.body!r:.300}"
                )
        elif (theirs.status, ours.status) != (pinned.kserve, pinned.ours):
            problems.append(
                f"{case.name}: pinned kserve {pinned.kserve} / ours {pinned.ours}, got "
                f"{theirs.status} / {ours.status}: {theirs.body!r:.200} / {ours.body!r:.200}"
            )
        elif ours.status == theirs.status and normalised(ours, case) == normalised(theirs, case):
            problems.append(f"{case.name}: pinned as different but both answer {ours.body!r:.200}")
        if ours.status >= 400 and not (isinstance(ours.body, dict) and ours.body.get("error")):
            problems.append(f'{case.name}: ours answered {ours.status} without an "error"')
        if ours.status >= 500:
            problems.append(f"{case.name}: ours answered {ours.status} (only a model failure may)")
        if case.path.endswith((":predict", "/infer")) and ours.status in (200, 400, 413):
            want = expected_id(case)
            if ours.request_id is None or (want is not None and ours.request_id != want):
                problems.append(f"{case.name}: X-Request-Id {ours.request_id!r}, want {want!r}")
            body = ours.body if isinstance(ours.body, dict) else {}
            if "outputs" in body and body["id"] != ours.request_id:
                problems.append(f"{case.name}: body id {ours.body['id']} != header")
    return problems


def test_corpus_answers_as_kserve_does_or_as_pinned(pair: Pair) -> None:
    problems = compare(pair, CORPUS)
    assert not problems, "\n".join(problems)


def test_pinned_differences_are_all_in_the_corpus() -> None:
    names = [case.name for case in CORPUS]
    assert len(names) == len(set(names))
    assert set(DIFFERENCES) <= set(names), set(DIFFERENCES) - set(names)


def test_errors_name_the_field(pair: Pair) -> None:
    """Spot checks of the messages both servers answer (the comparison says they agree)."""
    by_name = {case.name: case for case in CORPUS}
    expected = {
        "v1 wrong row width": ['"instances"', "[1, 2]", "expected [n, 30]"],
        "v2 shape and data disagree": ["inputs[0].data", "90", "[2, 30]", "60"],
        "v2 bytes datatype": ["inputs[0].datatype", '"BYTES"', "FP32"],
        "v2 int8 overflow": ["inputs[0].data", "300", "INT8"],
        "v2 strings in fp32": ["inputs[0].data", "numbers", '"1.5"'],
        "v2 unknown output": ["outputs[0].name", '"logits"', "'probabilities'"],
        "v2 two inputs": ['"inputs"', "exactly 1", "got 2"],
        "v1 oversized batch": ['"instances"', "65 rows", "--max-batch-rows"],
        "v1 oversized body": ["--max-body-bytes", str(MAX_BODY_BYTES)],
        "v2 unknown model": ["other", "'cancer'"],
        "v2 other version": ["'v9'", f"'{VERSION}'"],
    }
    for name, fragments in expected.items():
        answer = send(pair.ours.url, by_name[name])
        for fragment in fragments:
            assert fragment in answer.body["error"], (name, fragment, answer.body)


def test_predictions_match_the_artifact(pair: Pair, classifier_dir: Path) -> None:
    want = load_model(classifier_dir).predict(np.asarray(ROWS, dtype=np.float32))
    for url in (pair.kserve.url, pair.ours.url):
        v1 = send(url, Case("", "POST", PREDICT, {"instances": ROWS}))
        np.testing.assert_allclose(v1.body["predictions"], want, rtol=1e-6)
        answer = send(url, Case("", "POST", INFER, v2("FP64")))
        [output] = answer.body["outputs"]
        assert (output["name"], output["shape"], output["datatype"]) == (
            "probabilities", [3, 2], "FP32",
        )  # fmt: skip
        np.testing.assert_allclose(np.reshape(output["data"], (3, 2)), want, rtol=1e-6)


@pytest.fixture(scope="module")
def regression_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    model_dir = train_regression_model(tmp_path_factory.mktemp("regression"))
    servers = start_pair(model_dir, tmp_path_factory.mktemp("regression-logs"))
    try:
        yield servers
    finally:
        stop_server(servers.ours)
        stop_server(servers.kserve)


def test_regression_model_answers_as_kserve_does(regression_pair: Pair) -> None:
    corpus = [c for c in CORPUS if c.name.startswith(("v1 ", "v2 ", "model metadata"))]
    corpus = [c for c in corpus if "output" not in c.name]  # outputs are named differently
    problems = compare(regression_pair, corpus)
    assert not problems, "\n".join(problems)
    answer = send(regression_pair.ours.url, Case("", "POST", INFER, v2()))
    [output] = answer.body["outputs"]
    assert (output["name"], output["shape"], output["datatype"]) == ("predictions", [3], "FP32")
    metadata = send(regression_pair.ours.url, Case("", "GET", f"/v2/models/{MODEL}"))
    assert metadata.body["outputs"] == [{"name": "predictions", "datatype": "FP32", "shape": [-1]}]


# --- gRPC ------------------------------------------------------------------------------


def grpc_call(port: int, method: str, request: Any, metadata: Any = ()) -> tuple[Any, Any]:
    """(response, trailing metadata) of one unary call, or raises grpc.RpcError."""
    pb = stubs()
    response_type = getattr(pb, method + "Response")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        call = channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        response, state = call.with_call(request, metadata=metadata, timeout=30)
        return response, dict(state.trailing_metadata() or ())


def infer_request(datatype: str = "FP32", *, raw: bool = False, **fields: Any) -> Any:
    """A ModelInfer request for ROWS: values in the datatype's contents field, or raw bytes."""
    pb = stubs()
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[3, 30])
    request = pb.ModelInferRequest(model_name=MODEL, **fields)
    if raw:
        request.raw_input_contents.append(_X.astype(DATATYPES[datatype]).tobytes())
    else:
        key, _ = GRPC_CONTENTS[datatype]
        values = SMALL.astype(int) if datatype.startswith(("INT", "UINT")) else _X
        getattr(tensor.contents, key).extend(values.ravel().tolist())
    request.inputs.append(tensor)
    return request


def outputs_of(response: Any) -> np.ndarray[Any, Any]:
    [output] = response.outputs
    assert (output.name, list(output.shape), output.datatype) == ("probabilities", [3, 2], "FP32")
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 2)
    return np.asarray(output.contents.fp32_contents, dtype=np.float32).reshape(3, 2)


def test_grpc_infer_matches_kserve_and_the_artifact(pair: Pair, classifier_dir: Path) -> None:
    model = load_model(classifier_dir)
    for datatype, raw in (("FP32", False), ("FP64", False), ("INT32", False), ("FP32", True)):
        request = infer_request(datatype, raw=raw, id=GIVEN_ID)
        theirs, _ = grpc_call(pair.kserve_grpc, "ModelInfer", request)
        ours, trailing = grpc_call(pair.ours_grpc, "ModelInfer", request)
        assert (ours.id, ours.model_name, ours.model_version) == (GIVEN_ID, MODEL, VERSION)
        assert theirs.id == GIVEN_ID
        assert bool(ours.raw_output_contents) == raw == bool(theirs.raw_output_contents)
        assert trailing["x-request-id"] == GIVEN_ID
        rows = (SMALL if datatype == "INT32" else _X).astype(np.float32)
        np.testing.assert_allclose(outputs_of(ours), model.predict(rows), rtol=1e-6)
        np.testing.assert_array_equal(outputs_of(ours), outputs_of(theirs))
    # no id: the x-request-id metadata, else a fresh uuid4
    ours, trailing = grpc_call(pair.ours_grpc, "ModelInfer", infer_request(),
                               (("x-request-id", "from-metadata"),))  # fmt: skip
    assert ours.id == trailing["x-request-id"] == "from-metadata"
    ours, _ = grpc_call(pair.ours_grpc, "ModelInfer", infer_request())
    assert _is_uuid(ours.id)


def test_grpc_health_and_metadata(pair: Pair) -> None:
    pb = stubs()
    assert grpc_call(pair.ours_grpc, "ServerLive", pb.ServerLiveRequest())[0].live
    assert grpc_call(pair.ours_grpc, "ServerReady", pb.ServerReadyRequest())[0].ready
    ready, _ = grpc_call(pair.ours_grpc, "ModelReady", pb.ModelReadyRequest(name=MODEL))
    assert ready.ready
    server, _ = grpc_call(pair.ours_grpc, "ServerMetadata", pb.ServerMetadataRequest())
    assert server.name == "kubeloop"
    ours, _ = grpc_call(pair.ours_grpc, "ModelMetadata", pb.ModelMetadataRequest(name=MODEL))
    theirs, _ = grpc_call(pair.kserve_grpc, "ModelMetadata", pb.ModelMetadataRequest(name=MODEL))
    assert list(ours.versions) == [VERSION]
    assert (ours.inputs, ours.outputs) == (theirs.inputs, theirs.outputs)
    assert [(t.name, t.datatype, list(t.shape)) for t in ours.inputs] == [
        ("features", "FP32", [-1, 30])
    ]


def grpc_error(port: int, method: str, request: Any) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(port, method, request)
    return info.value.code(), info.value.details()


def test_grpc_errors_are_status_codes_naming_the_field(pair: Pair) -> None:
    pb = stubs()
    other = pb.ModelReadyRequest(name="other")
    assert grpc_error(pair.ours_grpc, "ModelReady", other) == (
        grpc.StatusCode.NOT_FOUND,
        "Model with name other does not exist. This server serves 'cancer'.",
    )
    assert grpc_error(pair.kserve_grpc, "ModelReady", other)[0] == grpc.StatusCode.NOT_FOUND
    wrong_model = infer_request()
    wrong_model.model_name = "other"
    assert grpc_error(pair.ours_grpc, "ModelInfer", wrong_model)[0] == grpc.StatusCode.NOT_FOUND

    narrow = infer_request()
    narrow.inputs[0].shape[:] = [9, 10]
    misplaced = infer_request("FP32")
    misplaced.inputs[0].contents.fp64_contents.extend(misplaced.inputs[0].contents.fp32_contents)
    del misplaced.inputs[0].contents.fp32_contents[:]
    bytes_type = infer_request()
    bytes_type.inputs[0].datatype = "BYTES"
    cases = {
        "narrow": (narrow, ["inputs[0]", "[9, 10]", "expected [n, 30]"]),
        "misplaced": (misplaced, ["inputs[0].contents.fp32_contents", "0 values", "90"]),
        "bytes": (bytes_type, ["inputs[0].datatype", '"BYTES"']),
    }
    for name, (request, fragments) in cases.items():
        code, message = grpc_error(pair.ours_grpc, "ModelInfer", request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, message)
        for fragment in fragments:
            assert fragment in message, (name, fragment, message)
        # kserve's gRPC server answers the same code with the same message (the adapter's)
        assert grpc_error(pair.kserve_grpc, "ModelInfer", request) == (code, message), name


def test_grpc_requests_are_counted(pair: Pair) -> None:
    before = metric_samples(pair.ours.url)
    grpc_call(pair.ours_grpc, "ModelInfer", infer_request())
    narrow = infer_request()
    narrow.inputs[0].shape[:] = [9, 10]
    grpc_error(pair.ours_grpc, "ModelInfer", narrow)
    after = metric_samples(pair.ours.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kubeloop_requests_total", code="200") == 1
    assert delta("kubeloop_requests_total", code="400") == 1
    predictions = sum(delta("kubeloop_prediction_bucket_total", bucket=str(b)) for b in range(10))
    assert predictions == 3  # the rows of the answered request
