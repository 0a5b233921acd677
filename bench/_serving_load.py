"""Closed-loop REST load for bench/serving.py, and the request bodies of its two REST protocols.

- json: the v2 JSON body, the input's numbers in `data`; the answer's logits as JSON numbers.
- binary: the binary tensor data extension (as Triton's and KServe's clients send it): a JSON header
  of `Inference-Header-Content-Length` bytes, then the input's raw little-endian bytes; the output is
  asked for with `parameters.binary_data: true`, so the answer is a JSON header and raw FP32 bytes.

The load generator is a minimal asyncio HTTP/1.1 client (httpx costs more CPU than the servers on a
2-core machine and would cap both): C keep-alive connections, each sending the next request when
the previous answer arrives. Each request is built once and sent as the same bytes every time.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from _serving_servers import http

HEADER = "Inference-Header-Content-Length"


def request_tensor(spec: dict, seed: int = 0) -> np.ndarray:
    """The bench's one request tensor (the same numbers as bench/_serving_grpc.py sends)."""
    rng = np.random.default_rng(seed)
    if spec["datatype"] == "INT64":
        return rng.integers(0, 30, size=spec["shape"]).astype("<i8")
    return rng.standard_normal(spec["shape"]).astype("<f4")


def json_body(spec: dict, seed: int = 0) -> bytes:
    data = request_tensor(spec, seed).ravel().tolist()
    return json.dumps({"id": "bench", "inputs": [{"name": "input", **spec, "data": data}]}).encode()


def binary_body(spec: dict, seed: int = 0) -> tuple[bytes, dict[str, str]]:
    """(body, its HTTP headers): JSON header + raw input bytes, the output asked for as binary."""
    raw = request_tensor(spec, seed).tobytes()
    head = json.dumps(
        {
            "id": "bench",
            "inputs": [{"name": "input", **spec, "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + raw, {"Content-Type": "application/octet-stream", HEADER: str(len(head))}


def rest_request(protocol: str, spec: dict) -> tuple[bytes, dict[str, str]]:
    if protocol == "binary":
        return binary_body(spec)
    return json_body(spec), {"Content-Type": "application/json"}


def decode_answer(headers: dict[str, str], raw: bytes) -> tuple[np.ndarray, str]:
    """(first output flattened, "binary" or "json": how the output came back)."""
    length = headers.get(HEADER.lower())
    head = json.loads(raw[: int(length)] if length is not None else raw)
    output = head["outputs"][0]
    size = (output.get("parameters") or {}).get("binary_data_size")
    if length is not None and size is not None:
        start = int(length)
        return np.frombuffer(raw[start : start + size], "<f4").copy(), "binary"
    return np.array(output["data"], dtype=np.float32).ravel(), "json"


def answer(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[np.ndarray, str]:
    status, got_headers, raw = http("POST", f"http://127.0.0.1:{port}{path}", body, headers)
    if status != 200:
        raise RuntimeError(f"port {port} answered {status}: {raw[:300]!r}")
    return decode_answer(got_headers, raw)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")  # not Inference-Header-Content-Length
    if at >= 0:
        length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
        return status, await reader.readexactly(length)
    body = b""  # chunked
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def _drive(port: int, request: bytes, concurrency: int, seconds: float, max_requests: int):
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                started = time.perf_counter()
                writer.write(request)
                status, _ = await _read_response(reader)
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def run_load(port: int, path: str, body: bytes, headers: dict[str, str], concurrency: int, args, warm: bool):
    """One measured stretch of closed-loop load (after a warm-up stretch if `warm`):
    (latencies, errors, seconds)."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()] + [f"Content-Length: {len(body)}"]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    if warm:
        asyncio.run(_drive(port, request, concurrency, args.warmup, 10**9))
    return asyncio.run(_drive(port, request, concurrency, args.duration, args.max_requests))
