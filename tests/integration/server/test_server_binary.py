"""The binary tensor data extension and request limits against a real `python -m aidc_server` process.

One server (the example transformer, context 32) answers every case over real HTTP: binary and JSON
agree bit for bit, every malformed body is a 400 or 413 naming what is wrong, never a 500, and the
server still answers afterwards.
"""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest
import torch
from server_testkit import LM_SPEC, ServerProcess, is_ready, metric, wait_for, write_checkpoint

VOCAB, SEQ = 30, 32
SPEC = {**LM_SPEC, "config": {**LM_SPEC["config"], "seq_len": SEQ}}
LIMIT = 256 * 1024  # --max-request-bytes: small, so an oversized body costs little to send
TOKENS = np.random.default_rng(5).integers(0, VOCAB, size=(8, SEQ)).astype(np.int64)
PATH = "/v2/models/lm/infer"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    write_checkpoint(root / "ck", 7, SPEC, keys=None, seed=3)
    proc = ServerProcess(
        "--checkpoint-dir",
        str(root / "ck"),
        "--model-name",
        "lm",
        "--device",
        "cpu",  # the CPU runs the same placement code as a GPU (bench/device_checks.sh covers CUDA)
        "--max-request-bytes",
        str(LIMIT),
        env={"AIDC_GRPC_PORT": "0"},  # no second listener needed here
    )
    try:
        proc.wait_live()
        wait_for(lambda: is_ready(proc.base))
        yield proc
    finally:
        proc.stop()


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def cut_header(content: bytes, headers: dict[str, str], by: int) -> tuple[bytes, dict[str, str]]:
    """The same body with Inference-Header-Content-Length `by` bytes short of the JSON's end."""
    length = int(headers["Inference-Header-Content-Length"]) - by
    return content, {**headers, "Inference-Header-Content-Length": str(length)}


def token_input(shape: list[int], size: int, datatype: str = "INT64") -> dict:
    return {"name": "input", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def split_binary(r: httpx.Response) -> tuple[dict, bytes]:
    length = int(r.headers["inference-header-content-length"])
    return orjson.loads(r.content[:length]), r.content[length:]


def test_binary_request_and_logits_match_the_json_path_bit_for_bit(server):
    as_json = httpx.post(
        f"{server.base}{PATH}",
        json={
            "inputs": [
                {"name": "input", "datatype": "INT64", "shape": [8, SEQ], "data": TOKENS.ravel().tolist()}
            ]
        },
        timeout=30,
    )
    assert as_json.status_code == 200, as_json.text
    want = np.array(as_json.json()["outputs"][0]["data"], np.float32).reshape(8, SEQ, VOCAB)

    raw = TOKENS.astype("<i8").tobytes()
    header = {
        "inputs": [token_input([8, SEQ], len(raw))],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }
    content, headers = binary_body(header, raw)
    r = httpx.post(f"{server.base}{PATH}", content=content, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    doc, tail = split_binary(r)
    [out] = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("output", "FP32", [8, SEQ, VOCAB])
    assert "data" not in out and out["parameters"]["binary_data_size"] == len(tail) == 8 * SEQ * VOCAB * 4
    got = np.frombuffer(tail, "<f4").reshape(8, SEQ, VOCAB)
    np.testing.assert_array_equal(got, want)  # bit-exact: same network, same batch, no JSON rounding

    # Binary in, JSON out (no binary_data asked): the same numbers again.
    content, headers = binary_body({"inputs": [token_input([8, SEQ], len(raw))]}, raw)
    r = httpx.post(f"{server.base}{PATH}", content=content, headers=headers, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    np.testing.assert_array_equal(
        np.array(r.json()["outputs"][0]["data"], np.float32).reshape(want.shape), want
    )

    # JSON in, every output binary through the request-level parameter.
    r = httpx.post(
        f"{server.base}{PATH}",
        json={
            "parameters": {"binary_data_output": True},
            "inputs": [{"name": "input", "datatype": "INT64", "shape": [8, SEQ], "data": TOKENS.tolist()}],
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.frombuffer(split_binary(r)[1], "<f4").reshape(want.shape), want)
    assert "binary_tensor_data" in httpx.get(f"{server.base}/v2", timeout=10).json()["extensions"]


RAW = TOKENS[:2].astype("<i8").tobytes()  # [2, 32] INT64: 512 bytes
ONE = np.array([VOCAB], "<i8").tobytes()  # one token id just past the vocabulary
OCTETS = {"Content-Type": "application/octet-stream"}
HEADER = "Inference-Header-Content-Length"


def ids(shape: list[int], size, *blobs: bytes, datatype: str = "INT64", **extra) -> tuple[bytes, dict]:
    """A binary request with one token input declared as `shape` and `size` bytes, then `blobs`."""
    return binary_body({"inputs": [token_input(shape, size, datatype)], **extra}, *blobs)


NOT_BOOL = {"outputs": [{"name": "output", "parameters": {"binary_data": "yes"}}]}
BAD = [
    ("header longer than body", RAW, {HEADER: "99999"}, 400, f"{HEADER} is 99999"),
    ("header not a number", RAW, {HEADER: "12x"}, 400, f"{HEADER} must be"),
    ("header cuts the JSON", *cut_header(*ids([2, SEQ], 512, RAW), 5), 400, "malformed JSON"),
    (
        "size does not match shape",
        *ids([2, SEQ], 500, RAW[:500]),
        400,
        "binary_data_size is 500 but shape [2, 32] of INT64 (8 bytes each) needs 512",
    ),
    ("size past the end", *ids([2, SEQ], 1024, RAW), 400, "binary_data_size is 1024 but only 512 bytes"),
    ("bytes left over", *ids([2, SEQ], 512, RAW, b"\0" * 8), 400, "8 bytes after the JSON header"),
    ("size not an integer", *ids([2, SEQ], "512", RAW), 400, "binary_data_size must be a non-negative"),
    (
        "data and binary both",
        *binary_body({"inputs": [{**token_input([2, SEQ], 512), "data": [1]}]}, RAW),
        400,
        "has both 'data' and parameters.binary_data_size",
    ),
    (
        "binary size without header",
        orjson.dumps({"inputs": [token_input([2, SEQ], 512)]}),
        {"Content-Type": "application/json"},
        400,
        "binary_data_size without binary data",
    ),
    ("wrong datatype", *ids([2, 64], 512, RAW, datatype="FP32"), 400, "wrong datatype FP32, expected INT64"),
    ("wrong shape", *ids([1, 64], 512, RAW), 400, "input 'input': wrong shape [1, 64]"),
    ("token ids out of range", *ids([1, 1], 8, ONE), 400, "values must lie in [0, 29]"),
    ("BYTES for a token model", *ids([1], 7, b"\3\0\0\0abc", datatype="BYTES"), 400, "wrong datatype BYTES"),
    ("BYTES runs past", *ids([1], 5, b"\x09\0\0\0a", datatype="BYTES"), 400, "BYTES element 0 (9 bytes)"),
    ("binary_data not a bool", *ids([2, SEQ], 512, RAW, **NOT_BOOL), 400, "parameters.binary_data must be"),
    ("raw body cannot say its shape", RAW, OCTETS, 400, "a raw binary body cannot say its shape"),
    ("oversized body", b"\0" * (LIMIT + 1), OCTETS, 413, f"exceeds the limit of {LIMIT} bytes"),
]


@pytest.mark.parametrize(("case", "content", "headers", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_binary_input_is_a_4xx_naming_the_field(server, case, content, headers, status, message):
    r = httpx.post(f"{server.base}{PATH}", content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_oversized_chunked_body_names_the_limit(server):
    def chunks():  # no Content-Length: the server counts while streaming and stops at the limit
        for _ in range(5):
            yield b"\0" * (64 * 1024)

    r = httpx.post(f"{server.base}{PATH}", content=chunks(), timeout=30)
    assert r.status_code == 413 and f"limit of {LIMIT} bytes" in r.json()["error"]
    assert "max-request-bytes" in r.json()["error"]


def test_server_keeps_serving_after_bad_input_and_never_answers_500(server):
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for _, content, headers, status, _ in BAD:
            assert client.post(PATH, content=content, headers=headers).status_code == status
        assert is_ready(server.base)
        raw = TOKENS[:1].astype("<i8").tobytes()
        content, headers = binary_body({"inputs": [token_input([1, SEQ], len(raw))]}, raw)
        r = client.post(PATH, content=content, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [1, SEQ, VOCAB]
        text = client.get("/metrics").text
    assert metric(text, "aidc_server_requests_total", 'code="400"') >= len(BAD) - 1
    assert metric(text, "aidc_server_requests_total", 'code="500"') == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_device_cuda_without_a_gpu_refuses_to_start_and_says_why(tmp_path):
    proc = ServerProcess(
        "--checkpoint-dir",
        str(tmp_path),
        "--model-name",
        "lm",
        "--device",
        "cuda",
        env={"AIDC_GRPC_PORT": "0"},
    )
    try:
        assert proc.proc.wait(120) == 2
        assert "--device cuda but no CUDA device is usable" in proc.output()
    finally:
        proc.stop()
