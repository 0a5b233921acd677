"""Open Inference Protocol v2 tensor codec: JSON {name, datatype, shape, data} <-> numpy.

Pure functions, no HTTP and no model: the protocol layer and the tests use them directly. Tensors
sent as raw bytes after the JSON (the binary tensor data extension) are cut out by `aidc_server.binary`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from aidc_server.errors import InvalidInput

# Fixed-size datatypes. BYTES (variable-length strings) is an object array of `bytes`, handled apart.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPE_OF: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
BYTES = "BYTES"
DATATYPES = (*DTYPES, BYTES)


def datatype_of(array: np.ndarray) -> str | None:
    """The v2 datatype of an array (object arrays hold BYTES elements); None when there is none."""
    return BYTES if array.dtype == object else DATATYPE_OF.get(array.dtype)


# numpy kinds a JSON array may decode to for each family ("b" bool, "i"/"u" ints, "f" floats).
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_JSON_OUT = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True)
class TensorSpec:
    """Declared input or output of a model; -1 in shape means any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    value_range: tuple[int, int] | None = None  # e.g. token ids must index the embedding table
    max_shape: tuple[int, ...] | None = None  # per-dim upper bound (-1: none), e.g. context length

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def check(self, array: np.ndarray) -> None:
        """Raise InvalidInput unless `array` fits this spec (datatype and shape)."""
        datatype = datatype_of(array)
        if datatype != self.datatype:
            raise InvalidInput(f"input '{self.name}': wrong datatype {datatype}, expected {self.datatype}")
        if len(array.shape) != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, array.shape, strict=True)
        ):
            raise InvalidInput(
                f"input '{self.name}': wrong shape {list(array.shape)}, expected {list(self.shape)}"
                " (-1 = any size)"
            )
        if self.max_shape is not None:
            for axis, (limit, got) in enumerate(zip(self.max_shape, array.shape, strict=True)):
                if limit > 0 and not 1 <= got <= limit:
                    raise InvalidInput(
                        f"input '{self.name}': wrong shape {list(array.shape)}: dimension {axis} must be"
                        f" between 1 and {limit}"
                    )
        if self.value_range is not None and array.size:
            low, high = self.value_range
            if array.min() < low or array.max() > high:
                raise InvalidInput(f"input '{self.name}': values must lie in [{low}, {high}]")


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] | None = None  # names the client asked for; None = all
    binary_outputs: frozenset[str] = frozenset()  # outputs asked for as raw bytes (binary extension)
    all_binary: bool = False  # request parameter binary_data_output: every output as raw bytes

    def wants_binary(self, output: str) -> bool:
        return self.all_binary or output in self.binary_outputs


class BinaryData(Protocol):
    """Where inputs with `parameters.binary_data_size` take their bytes from (aidc_server.binary)."""

    def tensor(self, datatype: str, shape: list[int], size: Any, where: str) -> np.ndarray: ...


def decode_tensor(obj: Any, index: int, binary: BinaryData | None = None) -> tuple[str, np.ndarray]:
    """Validate one request tensor and return (name, array shaped as declared)."""
    if not isinstance(obj, dict):
        raise InvalidInput(f"inputs[{index}] must be an object with name, datatype, shape, data")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}]: 'name' must be a non-empty string")
    where = f"input '{name}'"
    datatype = obj.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"{where}: 'datatype' must be a string such as FP32")
    datatype = datatype.upper()
    if datatype not in DATATYPES:
        raise InvalidInput(f"{where}: unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    if "binary_data_size" in params:
        if "data" in obj:
            raise InvalidInput(f"{where}: has both 'data' and parameters.binary_data_size; send one")
        if binary is None:
            raise InvalidInput(
                f"{where}: parameters.binary_data_size without binary data: send the JSON header's length "
                "in the Inference-Header-Content-Length header, the tensor bytes after it"
            )
        return name, binary.tensor(datatype, shape, params["binary_data_size"], where)
    if "data" not in obj:
        raise InvalidInput(f"{where}: 'data' is missing")
    if datatype == BYTES:
        return name, decode_bytes_data(obj["data"], shape, where)
    return name, decode_data(obj["data"], DTYPES[datatype], shape, where)


def decode_data(data: Any, dtype: np.dtype, shape: list[int], where: str) -> np.ndarray:
    """JSON data (flat row-major or nested lists) -> array of `dtype` with `shape`."""
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: 'data' must be a JSON array")
    try:
        raw = np.array(data)  # infers bool/int/float/str; ragged nesting raises
    except (ValueError, OverflowError) as e:
        raise InvalidInput(f"{where}: 'data' is not a regular array of numbers ({e})") from None
    expected = math.prod(shape)
    if raw.size != expected:
        raise InvalidInput(f"{where}: data has {raw.size} elements but shape {shape} needs {expected}")
    if raw.size and raw.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        found = {"U": "strings", "O": "mixed or null values", "f": "floats", "b": "booleans"}
        raise InvalidInput(
            f"{where}: datatype {DATATYPE_OF[dtype]} but data holds "
            f"{found.get(raw.dtype.kind, raw.dtype.name)}"
        )
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidInput(f"{where}: value out of range for {DATATYPE_OF[dtype]}")
    return raw.astype(dtype, copy=False).reshape(shape)


def decode_bytes_data(data: Any, shape: list[int], where: str) -> np.ndarray:
    """JSON BYTES data: a flat or nested array of strings -> object array of UTF-8 `bytes`."""
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: 'data' must be a JSON array")
    flat: list[Any] = []
    stack = [data]
    while stack:  # flatten nested lists without recursion (a hostile body could nest deeply)
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if not all(isinstance(v, str) for v in flat):
        raise InvalidInput(f"{where}: datatype BYTES but data holds non-strings")
    expected = math.prod(shape)
    if len(flat) != expected:
        raise InvalidInput(f"{where}: data has {len(flat)} elements but shape {shape} needs {expected}")
    array = np.empty(expected, dtype=object)
    array[:] = [v.encode() for v in flat]
    return array.reshape(shape)


def decode_request(body: bytes | memoryview, binary: BinaryData | None = None) -> InferRequest:
    """Parse and validate a v2 inference request (its JSON part; `binary` holds the bytes after it)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' array")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty array of tensors")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        name, array = decode_tensor(tensor, i, binary)
        if name in arrays:
            raise InvalidInput(f"input '{name}' appears twice")
        arrays[name] = array
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    outputs = doc.get("outputs")
    names: list[str] | None = None
    binary_outputs: set[str] = set()
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise InvalidInput("'outputs' must be an array of objects with a 'name'")
        names = [o["name"] for o in outputs]
        for o in outputs:
            if _flag(o.get("parameters"), "binary_data", f"output '{o['name']}'"):
                binary_outputs.add(o["name"])
    all_binary = _flag(doc.get("parameters"), "binary_data_output", "request")
    return InferRequest(arrays, request_id, names, frozenset(binary_outputs), all_binary)


def _flag(params: Any, key: str, where: str) -> bool:
    if params is None:
        return False
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: parameters.{key} must be true or false")
    return value


def encode_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    datatype = datatype_of(array)
    if datatype is None:
        raise TypeError(f"output '{name}' has dtype {array.dtype} with no v2 datatype")
    if datatype == BYTES:  # JSON strings; bytes that are not UTF-8 need the binary extension
        data = [bytes(v).decode(errors="replace") for v in array.ravel()]
        return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}
    # float16 is not one of orjson's native numpy types: widen for JSON, keep the declared type.
    data = array.astype(np.float32) if array.dtype == np.float16 else array
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data.ravel()}


def encode_response(
    model_name: str, model_version: str, outputs: dict[str, np.ndarray], request_id: str | None = None
) -> bytes:
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = [encode_tensor(n, np.ascontiguousarray(a)) for n, a in outputs.items()]
    return orjson.dumps(doc, option=_JSON_OUT)


def split_bytes(data: bytes | memoryview, shape: list[int], where: str, field: str) -> np.ndarray:
    """A BYTES tensor laid out as the binary extension and Triton's raw contents lay it out: each element
    a 4-byte little-endian length, then its bytes. Anything but exactly that is an error naming `field`."""
    view, count, offset, items = memoryview(data).cast("B"), math.prod(shape), 0, []
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(f"{where}: {field} ends before BYTES element {i}'s length")
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"{where}: {field} ends inside BYTES element {i} ({length} bytes)")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise InvalidInput(
            f"{where}: {field} has {len(view) - offset} bytes after the {count} BYTES elements"
            f" of shape {shape}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)
