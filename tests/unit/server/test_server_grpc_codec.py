"""ModelInferRequest/Response <-> numpy (aidc_server.grpc_codec), without a server."""

from __future__ import annotations

import numpy as np
import pytest

from aidc_server.errors import InvalidInput
from aidc_server.grpc_codec import decode_infer_request, encode_infer_response
from aidc_server.proto import grpc_predict_v2_pb2 as pb

Input = pb.ModelInferRequest.InferInputTensor
Contents = pb.InferTensorContents


def roundtrip(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    return pb.ModelInferRequest.FromString(request.SerializeToString())  # what the server receives


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("BOOL", "bool_contents", [True, False, True, True]),
        ("INT8", "int_contents", [-128, 0, 1, 127]),
        ("UINT16", "uint_contents", [0, 1, 2, 65535]),
        ("INT64", "int64_contents", [-(2**63), 0, 5, 2**63 - 1]),
        ("UINT64", "uint64_contents", [0, 1, 2**63, 2**64 - 1]),
        ("FP32", "fp32_contents", [0.1, -2.5, 3e38, 1e-45]),
        ("FP64", "fp64_contents", [0.1, -2.5, 1e308, 5e-324]),
    ],
)
def test_typed_contents_decode_exactly(datatype, field, values):
    request = pb.ModelInferRequest(
        inputs=[Input(name="x", datatype=datatype, shape=[2, 2], contents=Contents(**{field: values}))]
    )
    parsed, raw = decode_infer_request(roundtrip(request))
    array = parsed.inputs["x"]
    assert array.shape == (2, 2) and not raw
    expected = np.array(values, dtype=array.dtype).reshape(2, 2)
    np.testing.assert_array_equal(array, expected)
    # and back: the same field, the same values
    response = encode_infer_response("m", "1", {"y": array})
    assert list(getattr(response.outputs[0].contents, field)) == list(expected.ravel().tolist())


def test_raw_contents_are_little_endian_and_answered_raw():
    x = np.arange(6, dtype=np.float16).reshape(2, 3)  # FP16 has no typed field: raw only
    request = pb.ModelInferRequest(
        inputs=[Input(name="x", datatype="FP16", shape=[2, 3])],
        raw_input_contents=[x.astype("<f2").tobytes()],
    )
    parsed, raw = decode_infer_request(roundtrip(request))
    np.testing.assert_array_equal(parsed.inputs["x"], x)
    assert raw and parsed.inputs["x"].flags.writeable
    response = encode_infer_response("m", "1", {"y": x, "z": x.astype(np.float32)}, "id-1", raw=raw)
    assert [o.datatype for o in response.outputs] == ["FP16", "FP32"] and response.id == "id-1"
    assert response.raw_output_contents == [x.astype("<f2").tobytes(), x.astype("<f4").tobytes()]


def test_fp16_output_makes_the_whole_answer_raw_since_it_has_no_typed_field():
    response = encode_infer_response("m", "1", {"y": np.ones((1, 2), np.float16), "z": np.ones(3, np.int64)})
    assert len(response.raw_output_contents) == 2
    assert not response.outputs[1].contents.int64_contents


def test_fp16_in_typed_contents_is_refused_naming_raw():
    request = pb.ModelInferRequest(
        inputs=[Input(name="x", datatype="FP16", shape=[1], contents=Contents(fp32_contents=[1.0]))]
    )
    with pytest.raises(
        InvalidInput, match="input 'x': datatype FP16 has no typed contents field; send it in raw"
    ):
        decode_infer_request(request)


def test_binary_data_parameter_asks_for_raw_outputs():
    tensor = Input(name="x", datatype="FP32", shape=[1], contents=Contents(fp32_contents=[1.0]))
    flag = pb.InferParameter(bool_param=True)
    per_output = pb.ModelInferRequest(
        inputs=[tensor],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="y", parameters={"binary_data": flag})],
    )
    whole = pb.ModelInferRequest(inputs=[tensor], parameters={"binary_data_output": flag})
    off = pb.ModelInferRequest(
        inputs=[tensor], parameters={"binary_data_output": pb.InferParameter(bool_param=False)}
    )
    assert decode_infer_request(per_output)[1] and decode_infer_request(whole)[1]
    assert not decode_infer_request(off)[1]
    assert decode_infer_request(per_output)[0].outputs == ["y"]


def test_bytes_travel_typed_or_length_prefixed_raw():
    words = [b"cat", b"", "naïve".encode()]
    typed = pb.ModelInferRequest(
        inputs=[Input(name="s", datatype="BYTES", shape=[3], contents=Contents(bytes_contents=words))]
    )
    array = decode_infer_request(roundtrip(typed))[0].inputs["s"]
    assert array.dtype == object and list(array) == words
    prefixed = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    raw = pb.ModelInferRequest(
        inputs=[Input(name="s", datatype="BYTES", shape=[3])], raw_input_contents=[prefixed]
    )
    parsed, wants_raw = decode_infer_request(roundtrip(raw))
    assert list(parsed.inputs["s"]) == words and wants_raw
    assert list(encode_infer_response("m", "1", {"y": array}).outputs[0].contents.bytes_contents) == words
    assert encode_infer_response("m", "1", {"y": array}, raw=True).raw_output_contents == [prefixed]


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("BYTES", [2], b"\x03\0\0\0cat", "raw_input_contents ends before BYTES element 1's length"),
        ("BYTES", [1], b"\x09\0\0\0cat", "raw_input_contents ends inside BYTES element 0 (9 bytes)"),
        (
            "BYTES",
            [1],
            b"\x01\0\0\0ab",
            "raw_input_contents has 1 bytes after the 1 BYTES elements of shape [1]",
        ),
        ("BOOL", [2], b"\x01\x02", "raw_input_contents of BOOL must hold bytes 0 or 1"),
        ("FP32", [2], b"\0" * 7, "raw_input_contents has 7 bytes but shape [2] of FP32 needs 8"),
    ],
)
def test_bad_raw_contents_name_the_input_and_the_problem(datatype, shape, raw, message):
    request = pb.ModelInferRequest(
        inputs=[Input(name="x", datatype=datatype, shape=shape)], raw_input_contents=[raw]
    )
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(request)
    assert info.value.message == f"input 'x': {message}"
