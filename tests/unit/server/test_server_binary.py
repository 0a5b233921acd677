"""The binary tensor data extension codec: every datatype round-trips; every inconsistency is a named 400."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from aidc_server.binary import (
    decode_binary,
    decode_binary_request,
    decode_http_request,
    decode_raw_request,
    encode_binary,
    encode_binary_response,
    header_length,
)
from aidc_server.errors import InvalidInput
from aidc_server.tensors import DTYPES, InferRequest, TensorSpec, decode_request

SAMPLES = {
    **{name: np.arange(6).astype(dtype).reshape(2, 3) for name, dtype in DTYPES.items()},
    "BOOL": np.array([[True, False, True], [False, False, True]]),
}


def binary_input(datatype: str, shape: list[int], size) -> dict:
    return {"name": "x", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def request(inputs: list[dict], blobs: list[bytes], **extra) -> bytes:
    head = orjson.dumps({"inputs": inputs, **extra})
    return head + b"".join(blobs), len(head)


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_every_fixed_size_datatype_round_trips_bit_exactly(datatype):
    array = SAMPLES[datatype]
    raw = encode_binary(array)
    assert len(raw) == array.size * array.dtype.itemsize  # no padding, no header
    back = decode_binary(raw, datatype, [2, 3], "input 'x'")
    assert back.dtype == array.dtype and back.tobytes() == array.tobytes()


def test_layout_is_little_endian_row_major():
    assert encode_binary(np.array([[1, 2]], np.int32)) == b"\1\0\0\0\2\0\0\0"
    assert encode_binary(np.array([1], ">i4")) == b"\1\0\0\0"  # a big-endian array is written LE


def test_bytes_elements_carry_a_four_byte_length():
    array = np.array([b"ab", b"", "\u00e9".encode()], dtype=object)
    raw = encode_binary(array)
    assert raw == b"\2\0\0\0ab" + b"\0\0\0\0" + b"\2\0\0\0\xc3\xa9"
    back = decode_binary(raw, "BYTES", [3], "input 'x'")
    assert back.dtype == object and list(back) == [b"ab", b"", "\u00e9".encode()]


def test_binary_and_json_inputs_mix_in_input_order():
    tokens = np.arange(8, dtype=np.int64).reshape(2, 4)
    mask = np.ones((2, 4), np.float32)
    body, length = request(
        [
            {"name": "ids", "datatype": "INT64", "shape": [2, 4], "parameters": {"binary_data_size": 64}},
            {"name": "scale", "datatype": "FP32", "shape": [1], "data": [0.5]},
            {"name": "mask", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}},
        ],
        [tokens.tobytes(), mask.tobytes()],
        outputs=[{"name": "logits", "parameters": {"binary_data": True}}, {"name": "loss"}],
    )
    req = decode_binary_request(body, length)
    np.testing.assert_array_equal(req.inputs["ids"], tokens)
    np.testing.assert_array_equal(req.inputs["mask"], mask)
    assert req.inputs["scale"].tolist() == [0.5]
    assert req.wants_binary("logits") and not req.wants_binary("loss")


@pytest.mark.parametrize(
    ("inputs", "blobs", "message"),
    [
        (
            [binary_input("INT64", [2], 8)],
            [b"\0" * 8],
            "binary_data_size is 8 but shape [2] of INT64 (8 bytes each) needs 16",
        ),
        ([binary_input("INT64", [2], 16)], [b"\0" * 8], "binary_data_size is 16 but only 8 bytes"),
        ([binary_input("INT8", [2], 2)], [b"\0" * 3], "1 bytes after the JSON header belong to no input"),
        ([binary_input("INT8", [2], -2)], [b"\0" * 2], "binary_data_size must be a non-negative integer"),
        ([binary_input("INT8", [2], True)], [b"\0"], "binary_data_size must be a non-negative integer"),
        ([binary_input("BOOL", [1], 1)], [b"\2"], "BOOL bytes must be 0 or 1"),
        ([binary_input("BYTES", [2], 6)], [b"\2\0\0\0ab"], "ends before BYTES element 1's length"),
        ([binary_input("BYTES", [1], 7)], [b"\1\0\0\0abc"], "has 2 bytes after the 1 BYTES elements"),
        (
            [
                {
                    "name": "x",
                    "datatype": "INT8",
                    "shape": [1],
                    "data": [1],
                    "parameters": {"binary_data_size": 1},
                }
            ],
            [b"\0"],
            "has both 'data' and parameters.binary_data_size",
        ),
        (
            [{"name": "x", "datatype": "INT8", "shape": [1], "parameters": []}],
            [],
            "'parameters' must be an object",
        ),
    ],
)
def test_inconsistent_binary_requests_name_the_field(inputs, blobs, message):
    body, length = request(inputs, blobs)
    with pytest.raises(InvalidInput) as err:
        decode_binary_request(body, length)
    assert message in err.value.message and err.value.status_code == 400


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "must be a non-negative integer"),
        ("1e3", "must be a non-negative"),
        ("500", "body has only 10"),
    ],
)
def test_header_length_must_fit_the_body(value, message):
    with pytest.raises(InvalidInput, match=message):
        header_length(value, 10)
    assert header_length(None, 10) is None and header_length(" 4 ", 10) == 4


def test_plain_json_may_not_declare_binary_data():
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "parameters": {"binary_data_size": 1}}]}
    )
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        decode_request(body)


def test_raw_octet_stream_body_is_the_single_input():
    spec = TensorSpec("input", "FP32", (-1, 4))
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    req = decode_http_request(rows.tobytes(), "application/octet-stream", None, [spec])
    np.testing.assert_array_equal(req.inputs["input"], rows)
    assert req.wants_binary("output")  # no JSON in, raw bytes out
    with pytest.raises(InvalidInput, match="not a whole number of \\[4\\] FP32 rows"):
        decode_raw_request(rows.tobytes()[:-4], [spec])
    with pytest.raises(InvalidInput, match="cannot say its shape"):
        decode_raw_request(rows.tobytes(), [TensorSpec("input", "INT64", (-1, -1))])
    with pytest.raises(InvalidInput, match="needs a model with one input"):
        decode_raw_request(rows.tobytes(), [spec, TensorSpec("b", "FP32", (-1, 4))])


def test_json_content_without_the_header_stays_json():
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.5]}]})
    assert decode_http_request(body, "application/json", None, []).inputs["x"].tolist() == [2.5]


def test_response_puts_binary_outputs_after_the_json_in_order():
    logits = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    labels = np.array([2, 0], np.int64)
    names = np.array([b"cat", b"dog"], dtype=object)
    req = InferRequest({}, id="r9", binary_outputs=frozenset({"logits", "names"}))
    body, length = encode_binary_response("m", "3", {"logits": logits, "labels": labels, "names": names}, req)
    doc = orjson.loads(body[:length])
    assert doc["id"] == "r9" and [o["name"] for o in doc["outputs"]] == ["logits", "labels", "names"]
    assert doc["outputs"][1]["data"] == [2, 0]  # not asked for as binary: JSON as usual
    sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"] if "parameters" in o]
    assert sizes == [24, 14] and len(body) == length + 38
    tail = body[length:]
    assert np.frombuffer(tail[:24], "<f4").tobytes() == logits.tobytes()
    assert list(decode_binary(tail[24:], "BYTES", [2], "o")) == [b"cat", b"dog"]
