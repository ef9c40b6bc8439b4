"""The wire protocols' rules in one place, shared by the HTTP app (``app``), the gRPC server
(``grpc_server``) and kserve's ``Model`` adapter (``model_server``), so every path accepts
the same requests and answers the same errors.

- V1: ``{"instances": [[...], ...]}`` (or ``"inputs"``) → ``{"predictions": [...],
  "model_version": ...}``.
- V2 (Open Inference Protocol): one input tensor of shape [n, n_features] in any numeric
  datatype (JSON ``data``, or the binary tensor extension) → one FP32 output named
  ``probabilities`` (classification, [n, n_classes]) or ``predictions`` (regression, [n]).
- Request identity: the V2 ``id``, else the ``X-Request-Id`` header, else ``Ce-Id``, else a
  fresh uuid4.

Errors are :class:`ProtocolError` with an HTTP status (400, 404, 413) and a message that names
the field, the value and what would be accepted. Framework-free: numpy and orjson only.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

import kubeloop

Rows = npt.NDArray[np.float32]

SERVER_NAME = "kubeloop"
DEFAULT_MAX_BATCH_ROWS = 16_384
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

# Every numeric datatype the signature allows: the values become the model's FP32 rows.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(dtype).newbyteorder("<")
    for name, dtype in (
        ("FP16", np.float16),
        ("FP32", np.float32),
        ("FP64", np.float64),
        ("INT8", np.int8),
        ("INT16", np.int16),
        ("INT32", np.int32),
        ("INT64", np.int64),
        ("UINT8", np.uint8),
        ("UINT16", np.uint16),
        ("UINT32", np.uint32),
        ("UINT64", np.uint64),
    )
}
ACCEPTED = ", ".join(DATATYPES)
# gRPC: where each datatype's values travel in InferTensorContents, and their numpy type there
# (FP16 has no field: it travels only as raw bytes).
GRPC_CONTENTS: dict[str, tuple[str, type[np.generic]]] = {
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
}
# The binary tensor extension: the JSON part's length, the rest of the body is raw tensors.
BINARY_HEADER = "inference-header-content-length"

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class ProtocolError(Exception):
    """A request the protocol cannot answer: ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def body(self) -> bytes:
        return orjson.dumps({"error": self.message})


class ArtifactLike(Protocol):
    """What the protocols read of a loaded artifact (``artifact.LoadedModel``)."""

    @property
    def task(self) -> str: ...
    @property
    def features(self) -> Sequence[str]: ...
    @property
    def classes(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class Signature:
    """What one served version accepts and answers, as the protocols describe it."""

    model: str  # the deployment: the URL path and the V2 ``model_name``
    version: str  # the ModelVersion: ``model_version``
    task: str  # "classification" or "regression"
    features: tuple[str, ...]
    classes: tuple[str, ...] = ()
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS

    @classmethod
    def of(
        cls,
        model: ArtifactLike,
        name: str,
        version: str,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    ) -> Signature:
        return cls(
            name, version, model.task, tuple(model.features), tuple(model.classes), max_batch_rows
        )

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def output_name(self) -> str:
        return "probabilities" if self.task == "classification" else "predictions"

    def output_shape(self, n: int | None) -> list[int]:
        rows = -1 if n is None else n
        return [rows, len(self.classes)] if self.task == "classification" else [rows]

    def checked(self, rows: npt.NDArray[Any], field: str) -> Rows:
        """``rows`` as float32 [n, n_features], 1 <= n <= max_batch_rows, or ProtocolError."""
        if rows.ndim != 2 or rows.shape[1] != self.n_features or rows.shape[0] == 0:
            shown = ", ".join(self.features[:3])
            raise ProtocolError(
                f"{field}: input has shape {list(rows.shape)}; expected [n, {self.n_features}] "
                f"with n >= 1 (one row of {self.n_features} features: {shown}, ...)"
            )
        if rows.shape[0] > self.max_batch_rows:
            raise ProtocolError(
                f"{field}: {rows.shape[0]} rows in one request; at most {self.max_batch_rows} "
                "are accepted (--max-batch-rows): split the batch"
            )
        return rows if rows.dtype == np.float32 else rows.astype(np.float32)


def request_id(*candidates: str | None) -> str:
    """The first non-empty candidate (the V2 ``id``, ``X-Request-Id``, ``Ce-Id``) or a uuid4."""
    for candidate in candidates:
        if candidate:
            return candidate
    return str(uuid.uuid4())


def decode_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"request body is not valid JSON: {exc}") from None


def _describe(value: object) -> str:
    text = orjson.dumps(value, default=repr).decode() if value is not None else "null"
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )


# --- tensors -----------------------------------------------------------------------------


def checked_datatype(datatype: object, field: str) -> np.dtype[Any]:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(
            f"{field}: {_describe(datatype)} is not a datatype this model takes; expected one "
            f"of {ACCEPTED} (the values become the model's FP32 features)"
        )
    return DATATYPES[datatype]


def _checked_shape(shape: object, field: str) -> list[int]:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(
            f"{field}: {_describe(shape)} is not a shape; expected a list of sizes such as "
            "[n, n_features]"
        )
    return list(shape)


def _numbers(values: object, field: str) -> npt.NDArray[Any]:
    """JSON values as a numeric array (nested lists of numbers, any rectangular shape)."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):  # ragged nesting
        raise ProtocolError(
            f"{field} is not a rectangular array: its rows have different lengths"
        ) from None
    if array.dtype.kind not in "iuf" and array.size:
        bad = _first_non_number(values)
        example = f"got {_describe(bad[0])}" if bad else "got integers beyond 64 bits"
        raise ProtocolError(f"{field} must hold only numbers; {example}")
    return array


def _first_non_number(values: object) -> tuple[object] | None:
    stack = [values]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            return (value,)
    return None


def _fit(array: npt.NDArray[Any], dtype: np.dtype[Any], field: str, datatype: str) -> None:
    """Values of a JSON tensor must be representable in its declared integer datatype."""
    if dtype.kind not in "iu" or not array.size:
        return
    info = np.iinfo(dtype)
    if array.dtype.kind == "f" and not np.array_equal(array, np.trunc(array)):
        bad = array[array != np.trunc(array)].flat[0]
        raise ProtocolError(
            f"{field}: {datatype} holds integers; got {float(bad)!r} (send FP32 for fractions)"
        )
    low, high = array.min(), array.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise ProtocolError(
            f"{field}: {bad} does not fit {datatype} ([{info.min}, {info.max}]); use a wider "
            "datatype such as INT64 or FP32"
        )


def tensor_rows(
    values: object,
    *,
    name: str,
    datatype: object,
    shape: object,
    field: str,
    signature: Signature,
    data_field: str = "",
) -> Rows:
    """A tensor given as values (JSON ``data``, gRPC ``contents``) as the model's rows.

    ``field`` names the tensor in messages (``inputs[0]``), ``data_field`` its values
    (``inputs[0].data``); the values may be nested or flat, row-major, as long as they hold
    as many numbers as ``shape`` says."""
    data_field = data_field or f"{field}.data"
    dtype = checked_datatype(datatype, f"{field}.datatype")
    if datatype == "FP16":
        # kserve's rule, in its words: JSON numbers cannot say which FP16 value is meant.
        raise ProtocolError(
            "Sending FP16 data via JSON is not supported. Please use the binary data format "
            f"for input {name}"
        )
    dims = _checked_shape(shape, f"{field}.shape")
    array = _numbers(values, data_field)
    expected = math.prod(dims)
    if array.size != expected:
        raise ProtocolError(
            f"{data_field} holds {array.size} values; its shape {dims} needs {expected}"
        )
    _fit(array, dtype, data_field, str(datatype))
    return signature.checked(array.reshape(dims), field)


def raw_tensor_rows(
    raw: bytes, *, datatype: object, shape: object, field: str, signature: Signature
) -> Rows:
    """A tensor given as little-endian bytes (REST binary extension, gRPC raw contents)."""
    dtype = checked_datatype(datatype, f"{field}.datatype")
    dims = _checked_shape(shape, f"{field}.shape")
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(
            f"{field}: {len(raw)} bytes of raw data; its shape {dims} of {datatype} needs "
            f"{expected}"
        )
    return signature.checked(np.frombuffer(raw, dtype=dtype).reshape(dims), field)


# --- V1 ----------------------------------------------------------------------------------


def v1_rows(payload: object, signature: Signature) -> Rows:
    """The rows of a V1 request body (already JSON-decoded)."""
    width = signature.n_features
    if not isinstance(payload, dict):
        raise ProtocolError(
            f'request body must be a JSON object {{"instances": [[{width} numbers], ...]}}; '
            f"got {_kind(payload)}"
        )
    key = "instances" if "instances" in payload or "inputs" not in payload else "inputs"
    instances = payload.get(key)
    if instances is None:
        raise ProtocolError(
            f'"instances" is missing: expected {{"instances": [[{width} numbers], ...]}} '
            f'(or "inputs"); got the keys {sorted(payload)}'
        )
    if not isinstance(instances, list):
        raise ProtocolError(
            f'"{key}" must be a list of rows of {width} numbers; got {_kind(instances)}'
        )
    return signature.checked(_numbers(instances, f'"{key}"'), f'"{key}"')


def v1_response(outputs: Rows, signature: Signature) -> bytes:
    return orjson.dumps(
        {"predictions": _contiguous(outputs), "model_version": signature.version},
        option=_JSON_OPTIONS,
    )


# --- V2 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class V2Request:
    id: str | None
    rows: Rows
    binary_output: bool = False  # answer with the binary tensor extension


def body_id(payload: object) -> str | None:
    """The V2 body's ``id`` when it is one (a printable string: it is echoed in a header)."""
    rid = payload.get("id") if isinstance(payload, dict) else None
    return rid if isinstance(rid, str) and rid.isprintable() else None


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, raw tensor part) of a V2 body; the raw part is empty without the header."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise ProtocolError(
            f"{BINARY_HEADER}: {header_length!r} is not a length within the body's "
            f"{len(body)} bytes"
        )
    return body[:n], body[n:]


def _parameters(value: object, field: str) -> Mapping[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{field} must be an object of parameters; got {_kind(value)}")
    return value


def _flag(parameters: Mapping[str, object], key: str, field: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{field}.{key} must be true or false; got {_describe(value)}")
    return value


def one_input(count: int, signature: Signature) -> None:
    if count != 1:
        raise ProtocolError(
            f'"inputs" must be a list of exactly 1 tensor of shape [n, {signature.n_features}]; '
            f"got {count} inputs"
        )


def checked_outputs(names: Sequence[object], signature: Signature) -> None:
    """Requested outputs (V2 ``outputs[].name``) must be the one this model answers."""
    for i, name in enumerate(names):
        if name != signature.output_name:
            raise ProtocolError(
                f"outputs[{i}].name: {_describe(name)} is not an output of model "
                f"{signature.model!r}; expected {signature.output_name!r}"
            )


def v2_request(payload: object, signature: Signature, raw: bytes = b"") -> V2Request:
    """A V2 inference request body (already JSON-decoded; ``raw``: its binary tensor part)."""
    width = signature.n_features
    if not isinstance(payload, dict):
        raise ProtocolError(
            'request body must be a JSON object {"inputs": [{"name", "shape": [n, '
            f'{width}], "datatype": "FP32", "data"}}]}}; got {_kind(payload)}'
        )
    rid = body_id(payload)
    if rid is None and payload.get("id") is not None:
        raise ProtocolError(
            f'"id" must be a string of printable characters; got {_describe(payload["id"])}'
        )
    parameters = _parameters(payload.get("parameters"), '"parameters"')
    binary_output = _flag(parameters, "binary_data_output", '"parameters"')
    outputs = payload.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise ProtocolError(
                f'"outputs" must be a list of {{"name": ...}} objects; got {_describe(outputs)}'
            )
        checked_outputs([o.get("name") for o in outputs], signature)
        for i, output in enumerate(outputs):
            extra = _parameters(output.get("parameters"), f"outputs[{i}].parameters")
            if "binary_data" in extra:
                binary_output = _flag(extra, "binary_data", f"outputs[{i}].parameters")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list):
        raise ProtocolError(
            f'"inputs" must be a list of exactly 1 tensor of shape [n, {width}]; got '
            f"{_describe(inputs)}"
        )
    one_input(len(inputs), signature)
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise ProtocolError(
            f'inputs[0] must be an object {{"name", "shape", "datatype", "data"}}; '
            f"got {_kind(tensor)}"
        )
    for key in ("name", "shape", "datatype"):
        if key not in tensor:
            raise ProtocolError(f"inputs[0].{key} is missing")
    if not isinstance(tensor["name"], str):
        raise ProtocolError(f"inputs[0].name must be a string; got {_describe(tensor['name'])}")
    if "data" in tensor:
        rows = tensor_rows(
            tensor["data"],
            name=tensor["name"],
            datatype=tensor["datatype"],
            shape=tensor["shape"],
            field="inputs[0]",
            signature=signature,
        )
    else:
        size = _parameters(tensor.get("parameters"), "inputs[0].parameters").get("binary_data_size")
        if size is None:
            raise ProtocolError(
                "inputs[0].data is missing (or, with the binary extension, "
                "inputs[0].parameters.binary_data_size)"
            )
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(raw):
            raise ProtocolError(
                f"inputs[0].parameters.binary_data_size: {_describe(size)} does not fit the "
                f"{len(raw)} bytes after the JSON header"
            )
        rows = raw_tensor_rows(
            raw[:size],
            datatype=tensor["datatype"],
            shape=tensor["shape"],
            field="inputs[0]",
            signature=signature,
        )
    return V2Request(rid, rows, binary_output)


def v2_response(
    rid: str, outputs: Rows, signature: Signature, *, binary: bool = False
) -> tuple[bytes, int | None]:
    """(body, JSON header length) of a V2 response; the length is None unless ``binary``."""
    output: dict[str, object] = {
        "name": signature.output_name,
        "shape": list(outputs.shape),
        "datatype": "FP32",
    }
    raw = b""
    if binary:
        raw = np.ascontiguousarray(outputs, dtype="<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = _contiguous(outputs).ravel()
    header = orjson.dumps(
        {
            "id": rid,
            "model_name": signature.model,
            "model_version": signature.version,
            "outputs": [output],
        },
        option=_JSON_OPTIONS,
    )
    return (header + raw, len(header)) if binary else (header, None)


def _contiguous(outputs: Rows) -> Rows:
    # orjson serialises C-contiguous float32 arrays natively (their shortest float32 form).
    return outputs if outputs.flags.c_contiguous else np.ascontiguousarray(outputs)


# --- metadata ----------------------------------------------------------------------------


def server_metadata() -> dict[str, object]:
    return {"name": SERVER_NAME, "version": kubeloop.__version__, "extensions": []}


def input_metadata(signature: Signature) -> list[dict[str, object]]:
    return [{"name": "features", "datatype": "FP32", "shape": [-1, signature.n_features]}]


def output_metadata(signature: Signature) -> list[dict[str, object]]:
    return [
        {"name": signature.output_name, "datatype": "FP32", "shape": signature.output_shape(None)}
    ]


def model_metadata(signature: Signature) -> dict[str, object]:
    return {
        "name": signature.model,
        "versions": [signature.version],
        "platform": "",
        "inputs": input_metadata(signature),
        "outputs": output_metadata(signature),
    }


def unknown_model(name: str, signature: Signature) -> ProtocolError:
    return ProtocolError(
        f"Model with name {name} does not exist. This server serves {signature.model!r}.", 404
    )


def unknown_version(version: str, signature: Signature) -> ProtocolError:
    return ProtocolError(
        f"Model {signature.model!r} has no version {version!r}; this server serves version "
        f"{signature.version!r}.",
        404,
    )


def model_failure(exc: BaseException) -> ProtocolError:
    """A 500 for an exception the model raised (kserve's wording: type and message)."""
    return ProtocolError(f"{type(exc).__name__} : {exc}", 500)
