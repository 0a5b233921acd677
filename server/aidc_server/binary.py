"""The binary tensor data extension of the v2 REST protocol, as Triton and KServe implement it.

Request: the body is a JSON header of `Inference-Header-Content-Length` bytes followed by the raw
bytes of every input whose `parameters.binary_data_size` is set, in the order of `inputs`.
Little-endian, row-major, no padding; BOOL is one byte; a BYTES element is a 4-byte little-endian
length and then its bytes. A header length of 0 (or an `application/octet-stream` body without the
header) is a *raw* request: the whole body is the one input of a one-input model.
Response: outputs asked for with `parameters.binary_data: true` (or all of them, with the request
parameter `binary_data_output: true`) carry `parameters.binary_data_size` instead of `data`, and
their bytes follow the JSON in the same order; the JSON's length is in the response header.

Pure functions over bytes, no HTTP: every way a body can disagree with itself is an InvalidInput
naming the field, so nothing a client sends here can become a 500.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from aidc_server.errors import InvalidInput
from aidc_server.tensors import (
    BYTES,
    DTYPES,
    InferRequest,
    TensorSpec,
    datatype_of,
    decode_request,
    encode_tensor,
    split_bytes,
)

HEADER = "inference-header-content-length"
OCTET_STREAM = "application/octet-stream"


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON header's length from the HTTP header; None when the body is plain JSON."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, not {value!r}")
    length = int(text)
    if length > body_size:
        raise InvalidInput(
            f"Inference-Header-Content-Length is {length} but the body has only {body_size} bytes"
        )
    return length


class BinaryTail:
    """The bytes after the JSON header, handed out to inputs in order (no copies: numpy views)."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.offset = 0

    def tensor(self, datatype: str, shape: list[int], size: Any, where: str) -> np.ndarray:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{where}: parameters.binary_data_size must be a non-negative integer")
        left = len(self.data) - self.offset
        if size > left:
            raise InvalidInput(
                f"{where}: parameters.binary_data_size is {size} but only {left} bytes of binary data "
                "are left in the body"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return decode_binary(chunk, datatype, shape, where)

    def finish(self) -> None:
        extra = len(self.data) - self.offset
        if extra:
            raise InvalidInput(
                f"{extra} bytes after the JSON header belong to no input: the inputs' "
                f"parameters.binary_data_size add up to {self.offset}, the body carries {len(self.data)}"
            )


def decode_binary(chunk: memoryview | bytes, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """Raw tensor bytes -> array of `shape` (a read-only view of the body for fixed-size types)."""
    count = math.prod(shape)
    if datatype == BYTES:
        return split_bytes(chunk, shape, where, "the binary data")
    dtype = DTYPES[datatype].newbyteorder("<")
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise InvalidInput(
            f"{where}: parameters.binary_data_size is {len(chunk)} but shape {shape} of {datatype} "
            f"({dtype.itemsize} bytes each) needs {expected}"
        )
    array = np.frombuffer(chunk, dtype=dtype, count=count)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"{where}: BOOL bytes must be 0 or 1")
    return array.reshape(shape)


def decode_http_request(
    body: bytes, content_type: str | None, header: str | None, inputs: list[TensorSpec]
) -> InferRequest:
    """Any v2 REST inference body: plain JSON, JSON header + binary tensors, or a raw tensor."""
    length = header_length(header, len(body))
    if length is None and (content_type or "").lower().startswith(OCTET_STREAM):
        length = 0
    if length is None:
        return decode_request(body)
    if length == 0:
        return decode_raw_request(body, inputs)
    return decode_binary_request(body, length)


def decode_binary_request(body: bytes, length: int) -> InferRequest:
    """A request whose first `length` bytes are JSON and the rest binary tensor data."""
    view = memoryview(body)
    tail = BinaryTail(view[length:])
    request = decode_request(view[:length], tail)
    tail.finish()
    return request


def decode_raw_request(body: bytes, inputs: list[TensorSpec]) -> InferRequest:
    """The whole body is the single input; every dimension but the batch one must be fixed."""
    if len(inputs) != 1:
        names = [s.name for s in inputs]
        raise InvalidInput(
            f"a raw binary body (no JSON header) needs a model with one input; this one takes {names}"
        )
    spec = inputs[0]
    where = f"input '{spec.name}'"
    if spec.datatype == BYTES or any(d < 0 for d in spec.shape[1:]):
        raise InvalidInput(
            f"{where} has shape {list(spec.shape)} of {spec.datatype}: a raw binary body cannot say"
            " its shape; send a JSON header (Inference-Header-Content-Length) with shape and binary_data_size"
        )
    row = math.prod(spec.shape[1:]) * DTYPES[spec.datatype].itemsize
    if row == 0 or len(body) % row:
        raise InvalidInput(
            f"{where}: a raw binary body of {len(body)} bytes is not a whole number of "
            f"{list(spec.shape[1:])} {spec.datatype} rows ({row} bytes each)"
        )
    shape = [len(body) // row, *spec.shape[1:]]
    request = InferRequest({spec.name: decode_binary(body, spec.datatype, shape, where)})
    request.all_binary = True  # a client that sends no JSON gets none back but the header
    return request


def encode_binary(array: np.ndarray) -> bytes:
    """An array's bytes as the extension lays them out."""
    if array.dtype == object:
        parts = []
        for value in array.ravel():
            raw = bytes(value) if isinstance(value, bytes | bytearray) else str(value).encode()
            parts += [len(raw).to_bytes(4, "little"), raw]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_binary_response(
    model_name: str, model_version: str, outputs: dict[str, np.ndarray], request: InferRequest
) -> tuple[bytes, int]:
    """(body, JSON header length): outputs the request asked for as binary follow the JSON."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    tensors, blobs = [], []
    for name, array in outputs.items():
        if not request.wants_binary(name):
            tensors.append(encode_tensor(name, np.ascontiguousarray(array)))
            continue
        raw = encode_binary(array)
        blobs.append(raw)
        tensors.append(
            {
                "name": name,
                "datatype": datatype_of(array),
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        )
    doc["outputs"] = tensors
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return b"".join([header, *blobs]), len(header)
