"""Open Inference Protocol v2 gRPC tensor codec: ModelInferRequest/Response messages <-> numpy.

Pure functions, no server and no model, like tensors.py for JSON. Inputs come as typed contents
(`fp32_contents`, ...) or as `raw_input_contents` (little-endian row-major bytes, as Triton's
clients send them); outputs go back typed, or raw when the client asks for it. Every mistake is an
InvalidInput naming the field.
"""

from __future__ import annotations

import math

import numpy as np

from aidc_server.binary import encode_binary
from aidc_server.errors import InvalidInput
from aidc_server.proto import grpc_predict_v2_pb2 as pb
from aidc_server.tensors import BYTES, DATATYPE_OF, DATATYPES, DTYPES, InferRequest, datatype_of, split_bytes

# The InferTensorContents field of each datatype. FP16 has none: it travels raw only.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
# Each field's wire type, so values decode exactly (uint64 above 2**63 included) before narrowing.
_WIRE_DTYPE: dict[str, type] = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
    "bytes_contents": np.object_,
}
_ALL_FIELDS = tuple(_WIRE_DTYPE)
# Triton's names for "answer in raw_output_contents": on the request, or on one requested output.
_RAW_REQUEST_PARAMETER = "binary_data_output"
_RAW_OUTPUT_PARAMETER = "binary_data"


def decode_infer_request(request: pb.ModelInferRequest) -> tuple[InferRequest, bool]:
    """The request's tensors (shaped as declared) and whether the client wants raw outputs."""
    if not request.inputs:
        raise InvalidInput("'inputs' must hold at least one tensor")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but there are {len(request.inputs)} inputs;"
            " send one per input, in order, or none"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name, array = decode_input(tensor, index, raw[index] if raw else None)
        if name in arrays:
            raise InvalidInput(f"input '{name}' appears twice")
        arrays[name] = array
    names = [o.name for o in request.outputs] or None
    if names is not None and not all(names):
        raise InvalidInput("outputs: every requested output needs a 'name'")
    return InferRequest(inputs=arrays, id=request.id or None, outputs=names), wants_raw_outputs(request)


def decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor, index: int, raw: bytes | None
) -> tuple[str, np.ndarray]:
    if not tensor.name:
        raise InvalidInput(f"inputs[{index}]: 'name' must be a non-empty string")
    where = f"input '{tensor.name}'"
    datatype = tensor.datatype.upper()
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"{where}: unsupported datatype {tensor.datatype!r}; supported: {', '.join(DATATYPES)}"
        )
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}: 'shape' must hold non-negative integers, got {shape}")
    count = math.prod(shape)
    sent = [f for f in _ALL_FIELDS if len(getattr(tensor.contents, f))]
    if raw is not None:
        if sent:
            raise InvalidInput(
                f"{where}: has {sent[0]} and raw_input_contents; when raw_input_contents is used,"
                " every input must be given there only"
            )
        if datatype == BYTES:
            return tensor.name, split_bytes(raw, shape, where, "raw_input_contents")
        return tensor.name, decode_raw(raw, DTYPES[datatype], shape, where)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(
            f"{where}: datatype {datatype} has no typed contents field; send it in raw_input_contents"
        )
    wrong = [f for f in sent if f != field]
    if wrong:
        raise InvalidInput(f"{where}: datatype {datatype} takes contents.{field}, not contents.{wrong[0]}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"{where}: contents.{field} has {len(values)} elements but shape {shape} needs {count}"
        )
    if datatype == BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return tensor.name, array.reshape(shape)
    dtype = DTYPES[datatype]
    wide = np.array(values, dtype=_WIRE_DTYPE[field])
    if dtype.kind in "iu" and wide.size and dtype != wide.dtype:
        info = np.iinfo(dtype)  # int_contents is int32 on the wire: INT8/INT16 must fit
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"{where}: a value in contents.{field} is out of range for {datatype}")
    return tensor.name, wide.astype(dtype, copy=False).reshape(shape)


def decode_raw(raw: bytes, dtype: np.dtype, shape: list[int], where: str) -> np.ndarray:
    need = math.prod(shape) * dtype.itemsize
    if len(raw) != need:
        raise InvalidInput(
            f"{where}: raw_input_contents has {len(raw)} bytes but shape {shape} of"
            f" {DATATYPE_OF[dtype]} needs {need}"
        )
    # A copy: the message's bytes are read-only and torch wants arrays it may write.
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    if dtype.kind == "b" and array.size and np.frombuffer(raw, np.uint8).max() > 1:
        raise InvalidInput(f"{where}: raw_input_contents of BOOL must hold bytes 0 or 1")
    return array


def wants_raw_outputs(request: pb.ModelInferRequest) -> bool:
    """Raw outputs when the inputs came raw (as KServe answers) or a Triton binary_data flag asks."""
    if request.raw_input_contents:
        return True
    if _flag(request.parameters, _RAW_REQUEST_PARAMETER):
        return True
    return any(_flag(o.parameters, _RAW_OUTPUT_PARAMETER) for o in request.outputs)


def _flag(parameters, key: str) -> bool:
    value = parameters.get(key)
    return value is not None and value.WhichOneof("parameter_choice") == "bool_param" and value.bool_param


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: dict[str, np.ndarray],
    request_id: str | None = None,
    raw: bool = False,
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id or "")
    arrays = {n: np.ascontiguousarray(a) for n, a in outputs.items()}
    datatypes = {n: datatype_of(a) for n, a in arrays.items()}
    for name, datatype in datatypes.items():
        if datatype is None:
            raise TypeError(f"output '{name}' has dtype {arrays[name].dtype} with no v2 datatype")
    # The protocol allows no mixing: an FP16 output (no typed field) makes the whole answer raw.
    raw = raw or any(d not in CONTENTS_FIELD for d in datatypes.values())
    for name, array in arrays.items():
        datatype = datatypes[name]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(encode_binary(array))
        elif datatype == BYTES:
            tensor.contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()
            )
        else:
            getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())
    return response
