"""The v2 tensor codec: every datatype round-trips; every malformed tensor is a named 400."""

import math

import numpy as np
import orjson
import pytest

from aidc_server.errors import InvalidInput
from aidc_server.tensors import DTYPES, TensorSpec, decode_request, decode_tensor, encode_response


def tensor(data, shape, datatype="FP32", name="input"):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


@pytest.mark.parametrize("datatype", sorted(DTYPES))
def test_every_datatype_round_trips(datatype):
    values = [True, False, True, False, True, True] if datatype == "BOOL" else [0, 1, 2, 3, 4, 5]
    name, array = decode_tensor(tensor(values, [2, 3], datatype), 0)
    assert name == "input"
    assert array.dtype == DTYPES[datatype] and array.shape == (2, 3)
    doc = orjson.loads(encode_response("m", "1", {"out": array}))
    out = doc["outputs"][0]
    assert out["datatype"] == datatype and out["shape"] == [2, 3]
    assert out["data"] == [type(out["data"][0])(v) for v in values]


def test_nested_data_is_accepted_and_reshaped():
    _, array = decode_tensor(tensor([[1.5, 2], [3, 4]], [2, 2]), 0)
    np.testing.assert_array_equal(array, np.array([[1.5, 2], [3, 4]], dtype=np.float32))


def test_empty_batch_is_a_valid_tensor():
    _, array = decode_tensor(tensor([], [0, 4]), 0)
    assert array.shape == (0, 4)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (tensor([1, 2, 3], [2, 2]), "data has 3 elements but shape [2, 2] needs 4"),
        (tensor(["a", "b"], [2]), "holds strings"),
        (tensor([1.5, 2], [2], "INT64"), "holds floats"),
        (tensor([True, False], [2], "FP32"), "holds booleans"),
        (tensor([None, 1], [2]), "mixed or null"),
        (tensor([300], [1], "INT8"), "out of range for INT8"),
        (tensor([-1], [1], "UINT8"), "out of range for UINT8"),
        (tensor([1], [1], "BYTES"), "datatype BYTES but data holds non-strings"),
        (tensor([1], [1], "STRING"), "unsupported datatype"),
        (tensor([1], [1], 7), "'datatype' must be a string"),
        (tensor([1], [-1]), "non-negative integers"),
        (tensor([1], "1"), "non-negative integers"),
        (tensor([1], [True]), "non-negative integers"),
        (tensor(1.0, [1]), "must be a JSON array"),
        (tensor([[1, 2], [3]], [3]), "not a regular array"),
        ({"name": "x", "datatype": "FP32", "shape": [1]}, "'data' is missing"),
        ({"datatype": "FP32", "shape": [1], "data": [1]}, "'name' must be a non-empty string"),
        ([1, 2], "must be an object"),
    ],
)
def test_malformed_tensor_names_the_problem(obj, message):
    with pytest.raises(InvalidInput) as err:
        decode_tensor(obj, 0)
    assert message in err.value.message
    assert err.value.status_code == 400


def test_infinity_is_refused():
    # JSON has no NaN or infinity; an overflowing literal is a malformed-JSON 400, not a crash
    with pytest.raises(InvalidInput, match="malformed JSON"):
        decode_request(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1e999]}]}')


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "'inputs' must be a non-empty array"),
        (b'{"inputs": []}', "'inputs' must be a non-empty array"),
        (
            b'{"inputs": [{"name":"a","datatype":"FP32","shape":[1],"data":[1]},'
            b'{"name":"a","datatype":"FP32","shape":[1],"data":[1]}]}',
            "appears twice",
        ),
        (b'{"id": 5, "inputs": [{"name":"a","datatype":"FP32","shape":[1],"data":[1]}]}', "'id'"),
        (b'{"outputs": [1], "inputs": [{"name":"a","datatype":"FP32","shape":[1],"data":[1]}]}', "'outputs'"),
    ],
)
def test_malformed_request_names_the_problem(body, message):
    with pytest.raises(InvalidInput) as err:
        decode_request(body)
    assert message in err.value.message


def test_request_fields_are_parsed():
    req = decode_request(
        b'{"id":"r1","outputs":[{"name":"output"}],'
        b'"inputs":[{"name":"a","datatype":"INT32","shape":[1,2],"data":[1,2]}]}'
    )
    assert req.id == "r1" and req.outputs == ["output"]
    assert req.inputs["a"].dtype == np.int32 and req.inputs["a"].shape == (1, 2)


def test_fp16_outputs_are_encoded_as_fp16():
    doc = orjson.loads(encode_response("m", "3", {"o": np.array([0.5, 1.0], dtype=np.float16)}, "id7"))
    assert doc == {
        "model_name": "m",
        "model_version": "3",
        "id": "id7",
        "outputs": [{"name": "o", "datatype": "FP16", "shape": [2], "data": [0.5, 1.0]}],
    }


def test_float32_outputs_survive_json_exactly():
    values = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    doc = orjson.loads(encode_response("m", "1", {"o": values}))
    np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], dtype=np.float32), values)


class TestTensorSpec:
    spec = TensorSpec("input", "FP32", (-1, 4))

    def test_accepts_matching_array(self):
        self.spec.check(np.zeros((3, 4), np.float32))

    def test_wrong_datatype(self):
        with pytest.raises(InvalidInput, match="wrong datatype FP64, expected FP32"):
            self.spec.check(np.zeros((3, 4), np.float64))

    @pytest.mark.parametrize("shape", [(3, 5), (4,), (1, 4, 1)])
    def test_wrong_shape(self, shape):
        with pytest.raises(InvalidInput, match="wrong shape"):
            self.spec.check(np.zeros(shape, np.float32))

    def test_value_range(self):
        spec = TensorSpec("ids", "INT64", (-1, -1), (0, 9))
        spec.check(np.array([[0, 9]]))
        with pytest.raises(InvalidInput, match=r"values must lie in \[0, 9\]"):
            spec.check(np.array([[0, 10]]))

    def test_metadata(self):
        assert self.spec.metadata() == {"name": "input", "datatype": "FP32", "shape": [-1, 4]}


def test_large_request_decodes_quickly_enough():
    n = 256 * 784
    body = orjson.dumps({"inputs": [tensor(np.ones(n, np.float32).tolist(), [256, 784])]})
    req = decode_request(body)
    assert math.prod(req.inputs["input"].shape) == n
