"""Closed-loop gRPC load for bench/serving.py: its HTTP loop, over the Open Inference Protocol's gRPC half.

C channels, each its own HTTP/2 connection, each sending the next ModelInfer when the previous answer
arrives. The request is serialized once and sent as bytes (the generated stub would re-serialize it
on every call: client CPU the server is not to blame for on a 2-core machine).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from aidc_server.proto import grpc_predict_v2_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel, as C HTTP clients


def infer_request(model: str, spec: dict, seed: int = 0, raw: bool = True) -> bytes:
    """The bench's request tensor as a serialized ModelInferRequest: raw bytes (as Triton's client
    sends them) or typed contents."""
    rng = np.random.default_rng(seed)
    if spec["datatype"] == "INT64":
        array = rng.integers(0, 30, size=spec["shape"]).astype("<i8")
    else:
        array = rng.standard_normal(spec["shape"]).astype("<f4")
    Input = pb.ModelInferRequest.InferInputTensor
    tensor = Input(name="input", datatype=spec["datatype"], shape=spec["shape"])
    request = pb.ModelInferRequest(model_name=model, id="bench", inputs=[tensor])
    if raw:
        request.raw_input_contents.append(array.tobytes())
    elif spec["datatype"] == "INT64":
        tensor.contents.int64_contents.extend(array.ravel().tolist())
    else:
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    return request.SerializeToString()


def answer(address: str, request: bytes) -> tuple[np.ndarray, str]:
    """(the first output of one call flattened, "raw" or "typed": how it came back), for the bench's
    cross-check between servers."""
    with grpc.insecure_channel(address) as channel:
        response = pb.ModelInferResponse.FromString(channel.unary_unary(METHOD)(request, timeout=60))
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[0], "<f4").copy(), "raw"
    return np.array(response.outputs[0].contents.fp32_contents, np.float32), "typed"


async def _drive(address: str, request: bytes, concurrency: int, seconds: float, max_requests: int):
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        nonlocal errors
        async with grpc.aio.insecure_channel(address, options=_OWN_CONNECTION) as channel:
            infer = channel.unary_unary(METHOD)
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                started = time.perf_counter()
                try:
                    await infer(request, timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def run_grpc_load(address: str, request: bytes, concurrency: int, args, warm: bool):
    """One measured stretch (after a warm-up stretch if `warm`): (latencies, errors, seconds)."""
    if warm:
        asyncio.run(_drive(address, request, concurrency, args.warmup, 10**9))
    return asyncio.run(_drive(address, request, concurrency, args.duration, args.max_requests))
