"""The gRPC half of the Open Inference Protocol v2 against `python -m aidc_server`, with a grpcio client.

One process serves both protocols: the same model and batcher answer gRPC and REST, the same
readiness, the same drain. Every RPC, typed and raw tensor contents, each client error with its
status code and a message naming the field.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import torch
from server_testkit import (
    LM_SPEC,
    MLP_SPEC,
    ServerProcess,
    free_port,
    is_ready,
    metric,
    wait_for,
    write_checkpoint,
)

from aidc_server.proto import grpc_predict_v2_pb2 as pb
from aidc_server.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.tls import serving_cert

Input = pb.ModelInferRequest.InferInputTensor
Contents = pb.InferTensorContents
VOCAB, SEQ = LM_SPEC["config"]["vocab_size"], LM_SPEC["config"]["seq_len"]
TOKENS = np.random.default_rng(5).integers(0, VOCAB, (8, SEQ)).astype(np.int64)
X = np.random.default_rng(11).standard_normal((4, 10)).astype(np.float32)


class GrpcServer:
    """A server process with its gRPC port, and a client stub on it."""

    def __init__(self, *args: str, tls_ca: Path | None = None) -> None:
        self.grpc_port = free_port()
        self.process = ServerProcess(*args, "--grpc-port", str(self.grpc_port), tls_ca=tls_ca)
        self.base = self.process.base
        self.address = f"127.0.0.1:{self.grpc_port}"
        if tls_ca is None:
            self.channel = grpc.insecure_channel(self.address)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
            self.channel = grpc.secure_channel(self.address, credentials)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.process.stop()


@pytest.fixture
def grpc_server() -> Iterator:
    started: list[GrpcServer] = []

    def start(*args: str, tls_ca: Path | None = None) -> GrpcServer:
        server = GrpcServer(*args, tls_ca=tls_ca)
        started.append(server)
        server.process.wait_live()
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Iterator[tuple[GrpcServer, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("lm") / "ck"
    net = write_checkpoint(root, 7, LM_SPEC, keys=None)
    server = GrpcServer(
        "--checkpoint-dir", str(root), "--model-name", "lm", "--max-request-bytes", str(1024 * 1024)
    )
    try:
        server.process.wait_live()
        wait_for(lambda: is_ready(server.base))
        yield server, net
    finally:
        server.close()


def tokens_request(tokens: np.ndarray = TOKENS, **kw) -> pb.ModelInferRequest:
    typed = Input(
        name="input",
        datatype="INT64",
        shape=tokens.shape,
        contents=Contents(int64_contents=tokens.ravel().tolist()),
    )
    return pb.ModelInferRequest(model_name="lm", inputs=[typed], **kw)


def rest_logits(base: str, tokens: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "INT64",
                "shape": list(tokens.shape),
                "data": tokens.ravel().tolist(),
            }
        ]
    }
    r = httpx.post(f"{base}/v2/models/lm/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def typed_output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    assert tensor.datatype == "FP32" and not response.raw_output_contents
    return np.array(tensor.contents.fp32_contents, np.float32).reshape(tensor.shape)


def raw_output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    assert tensor.datatype == "FP32" and not tensor.contents.fp32_contents
    return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(tensor.shape)


def test_health_and_metadata_rpcs_tell_what_rest_tells(lm):
    server, _ = lm
    stub = server.stub
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="lm")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="lm", version="7")).ready

    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    rest = httpx.get(f"{server.base}/v2", timeout=10).json()
    assert (meta.name, meta.version) == (rest["name"], rest["version"])

    model = stub.ModelMetadata(pb.ModelMetadataRequest(name="lm"))
    rest = httpx.get(f"{server.base}/v2/models/lm", timeout=10).json()
    assert (model.name, list(model.versions), model.platform) == (
        rest["name"],
        rest["versions"],
        rest["platform"],
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in rest["inputs"]
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("output", "FP32", [-1, -1, VOCAB])
    ]


def test_typed_and_raw_contents_answer_what_rest_answers(lm):
    server, net = lm
    want = rest_logits(server.base, TOKENS)
    with torch.inference_mode():
        np.testing.assert_allclose(want, net(torch.from_numpy(TOKENS)).numpy(), rtol=1e-5, atol=1e-5)

    typed = server.stub.ModelInfer(tokens_request(id="req-1"))
    assert (typed.model_name, typed.model_version, typed.id) == ("lm", "7", "req-1")
    np.testing.assert_array_equal(typed_output(typed), want)

    # Triton's clients: little-endian bytes in raw_input_contents; the answer comes raw as well.
    raw_input = Input(name="input", datatype="INT64", shape=TOKENS.shape)
    raw = server.stub.ModelInfer(
        pb.ModelInferRequest(
            model_name="lm", inputs=[raw_input], raw_input_contents=[TOKENS.astype("<i8").tobytes()]
        )
    )
    np.testing.assert_array_equal(raw_output(raw), want)

    # Typed inputs, raw outputs when a requested output asks for binary data (Triton's flag).
    binary = pb.InferParameter(bool_param=True)
    asked = server.stub.ModelInfer(
        tokens_request(
            outputs=[
                pb.ModelInferRequest.InferRequestedOutputTensor(
                    name="output", parameters={"binary_data": binary}
                )
            ]
        )
    )
    assert [o.name for o in asked.outputs] == ["output"]
    np.testing.assert_array_equal(raw_output(asked), want)


def malformed(server: GrpcServer) -> None:
    """Bytes that are no protobuf message, sent without the generated stub's serializer."""
    server.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff\xff", timeout=60)


def tensor(**kw) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="lm", inputs=[Input(**kw)])


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
ERRORS = [
    (
        pb.ModelInferRequest(model_name="nope", inputs=tokens_request().inputs),
        NOT_FOUND,
        "unknown model 'nope'",
    ),
    (tokens_request(model_version="99"), NOT_FOUND, "model_version: unknown version '99'"),
    (pb.ModelInferRequest(model_name="lm"), INVALID, "'inputs' must hold at least one tensor"),
    (tensor(name="", datatype="INT64", shape=[1, 2]), INVALID, "inputs[0]: 'name' must be a non-empty"),
    (
        tensor(name="input", datatype="STRING", shape=[1]),
        INVALID,
        "input 'input': unsupported datatype 'STRING'",
    ),
    (
        tensor(name="input", datatype="INT64", shape=[1, -2], contents=Contents(int64_contents=[1, 2])),
        INVALID,
        "input 'input': 'shape' must hold non-negative integers",
    ),
    (
        tensor(name="input", datatype="INT64", shape=[2, 4], contents=Contents(int64_contents=[1, 2, 3])),
        INVALID,
        "input 'input': contents.int64_contents has 3 elements but shape [2, 4] needs 8",
    ),
    (
        tensor(name="input", datatype="INT64", shape=[1, 2], contents=Contents(fp32_contents=[1, 2])),
        INVALID,
        "input 'input': datatype INT64 takes contents.int64_contents, not contents.fp32_contents",
    ),
    (
        tensor(name="input", datatype="FP32", shape=[1, 2], contents=Contents(fp32_contents=[1, 2])),
        INVALID,
        "input 'input': wrong datatype FP32, expected INT64",
    ),
    (
        tensor(
            name="input", datatype="INT64", shape=[1, 2, 2], contents=Contents(int64_contents=[1, 2, 3, 4])
        ),
        INVALID,
        "input 'input': wrong shape [1, 2, 2]",
    ),
    (
        tensor(name="input", datatype="INT64", shape=[1, 2], contents=Contents(int64_contents=[1, VOCAB])),
        INVALID,
        f"input 'input': values must lie in [0, {VOCAB - 1}]",
    ),
    (
        tensor(name="input", datatype="INT8", shape=[1, 1], contents=Contents(int_contents=[300])),
        INVALID,
        "input 'input': a value in contents.int_contents is out of range for INT8",
    ),
    (
        pb.ModelInferRequest(
            model_name="lm",
            inputs=[Input(name="input", datatype="INT64", shape=[1, 2])],
            raw_input_contents=[b"\0" * 10],
        ),
        INVALID,
        "input 'input': raw_input_contents has 10 bytes but shape [1, 2] of INT64 needs 16",
    ),
    (
        pb.ModelInferRequest(
            model_name="lm",
            inputs=[Input(name="input", datatype="INT64", shape=[1, 1])],
            raw_input_contents=[b"\0" * 8] * 2,
        ),
        INVALID,
        "raw_input_contents has 2 entries but there are 1 inputs",
    ),
    (
        pb.ModelInferRequest(
            model_name="lm",
            inputs=[
                Input(name="input", datatype="INT64", shape=[1, 1], contents=Contents(int64_contents=[1]))
            ],
            raw_input_contents=[b"\0" * 8],
        ),
        INVALID,
        "input 'input': has int64_contents and raw_input_contents",
    ),
    (
        tokens_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")]),
        INVALID,
        "outputs: unknown output 'probs'",
    ),
]


def test_client_errors_get_their_status_code_and_a_message_naming_the_field(lm):
    server, _ = lm
    errors_before = metric(
        httpx.get(f"{server.base}/metrics", timeout=10).text, "aidc_server_requests_total", 'code="400"'
    )
    for request, code, message in ERRORS:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.ModelInfer(request, timeout=60)
        assert (info.value.code(), message) == (code, message) and message in info.value.details(), (
            info.value.details()
        )

    with pytest.raises(grpc.RpcError) as info:
        malformed(server)
    assert info.value.code() == INVALID and "malformed ModelInferRequest message" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=60)
    assert info.value.code() == NOT_FOUND and "unknown model 'nope'" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ModelMetadata(pb.ModelMetadataRequest(name="lm", version="3"), timeout=60)
    assert info.value.code() == NOT_FOUND and "unknown version '3'" in info.value.details()
    # Above --max-request-bytes (1 MiB): refused by gRPC before it is parsed.
    big = TOKENS[:1].repeat(math.ceil(2 * 1024 * 1024 / TOKENS[0].nbytes), axis=0)
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ModelInfer(tokens_request(big), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # The errors counted as REST counts its 400s; and the server still answers, on both protocols.
    invalid = sum(code == INVALID for _, code, _ in ERRORS)
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    assert metric(text, "aidc_server_requests_total", 'code="400"') - errors_before == invalid
    np.testing.assert_array_equal(
        typed_output(server.stub.ModelInfer(tokens_request())), rest_logits(server.base, TOKENS)
    )
    assert server.stub.ServerReady(pb.ServerReadyRequest()).ready


def rest_ready(base: str) -> bool:
    return httpx.get(f"{base}/v2/health/ready", timeout=10).status_code == 200


def mlp_request() -> pb.ModelInferRequest:
    typed = Input(
        name="input", datatype="FP32", shape=X.shape, contents=Contents(fp32_contents=X.ravel().tolist())
    )
    return pb.ModelInferRequest(model_name="mlp", inputs=[typed])


def test_readiness_is_one_truth_for_both_protocols(tmp_path, grpc_server):
    root = tmp_path / "ck"
    server = grpc_server(
        "--checkpoint-dir", str(root), "--model-name", "mlp", "--retry-seconds", "0.2",
        "--drain-seconds", "3600",
    )  # fmt: skip
    stub = server.stub
    # No checkpoint yet: live, not ready, inference UNAVAILABLE with the reason.
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=60).live
    assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=60).ready and not rest_ready(server.base)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=60).ready
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(mlp_request(), timeout=60)
    assert (
        info.value.code() == grpc.StatusCode.UNAVAILABLE
        and "model 'mlp' is not ready" in info.value.details()
    )

    net = write_checkpoint(root, 3, MLP_SPEC, keys=None)
    wait_for(lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=60).ready)
    assert rest_ready(server.base) and stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=60).ready
    with torch.inference_mode():
        want = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(
        typed_output(stub.ModelInfer(mlp_request(), timeout=60)), want, rtol=1e-5, atol=1e-6
    )

    # SIGTERM: both say "not ready" at once, and both keep serving through the drain window.
    os.kill(server.process.proc.pid, signal.SIGTERM)
    wait_for(lambda: not stub.ServerReady(pb.ServerReadyRequest(), timeout=60).ready)
    assert not rest_ready(server.base)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=60).ready
    np.testing.assert_allclose(
        typed_output(stub.ModelInfer(mlp_request(), timeout=60)), want, rtol=1e-5, atol=1e-6
    )
    os.kill(server.process.proc.pid, signal.SIGTERM)  # a second signal skips the rest of the window
    assert server.process.proc.wait(timeout=120) == 0


def grpc_refuses(address: str) -> bool:
    """A new channel gets no answer: the listener is closed."""
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAVAILABLE
    return False


class GatedBody:
    """A REST request body that stays half sent until the gate opens: the request is arriving."""

    def __init__(self, payload: bytes, gate: threading.Event) -> None:
        self.payload, self.gate = payload, gate

    def __iter__(self) -> Iterator[bytes]:
        yield self.payload[:20]
        self.gate.wait()
        yield self.payload[20:]


def test_sigterm_stops_new_calls_and_finishes_those_in_flight(tmp_path: Path, grpc_server):
    net = write_checkpoint(tmp_path / "ck", 1, MLP_SPEC, keys=None)
    # A batch waits for requests still arriving, up to --max-latency-ms: with a REST request held
    # half sent, gRPC calls queue behind it for as long as the test wants, at any machine speed.
    server = grpc_server(
        "--checkpoint-dir", str(tmp_path / "ck"), "--model-name", "mlp", "--max-latency-ms", "600000",
        "--drain-seconds", "0", "--drain-timeout-seconds", "600",
    )  # fmt: skip
    wait_for(lambda: is_ready(server.base))
    gate = threading.Event()
    rest: list[httpx.Response] = []
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 10], "data": X.ravel().tolist()}]}

    def arriving_rest_request() -> None:
        payload = GatedBody(orjson.dumps(body), gate)
        rest.append(httpx.post(f"{server.base}/v2/models/mlp/infer", content=payload, timeout=600))

    holder = threading.Thread(target=arriving_rest_request)
    calls = []
    try:
        holder.start()
        wait_for(
            lambda: metric(httpx.get(f"{server.base}/metrics").text, "aidc_server_requests_in_flight") == 1
        )
        calls = [server.stub.ModelInfer.future(mlp_request(), timeout=600) for _ in range(3)]
        wait_for(
            lambda: metric(httpx.get(f"{server.base}/metrics").text, "aidc_server_requests_in_flight") == 4
        )
        os.kill(server.process.proc.pid, signal.SIGTERM)
        wait_for(lambda: grpc_refuses(server.address))  # drain window (0 s) over: no new calls ...
        assert not any(c.done() for c in calls)  # ... the held ones neither answered nor dropped
        assert server.process.proc.poll() is None
    finally:
        gate.set()
    holder.join(600)
    with torch.inference_mode():
        want = net(torch.from_numpy(X)).numpy()
    for call in calls:
        np.testing.assert_allclose(typed_output(call.result(timeout=600)), want, rtol=1e-5, atol=1e-6)
    assert [r.status_code for r in rest] == [200]
    assert server.process.proc.wait(timeout=120) == 0
    assert "Cancel" not in server.process.output()  # no call outlived the graceful timeout


def test_grpc_is_served_over_tls_with_the_https_certificate(tmp_path, grpc_server):
    net = write_checkpoint(tmp_path / "ck", 2, MLP_SPEC, keys=None)
    tls = serving_cert(tmp_path / "tls")
    server = grpc_server(
        "--checkpoint-dir", str(tmp_path / "ck"), "--model-name", "mlp",
        "--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file), tls_ca=tls.ca_file,
    )  # fmt: skip
    wait_for(lambda: server.stub.ServerReady(pb.ServerReadyRequest(), timeout=60).ready)
    with torch.inference_mode():
        want = net(torch.from_numpy(X)).numpy()
    got = typed_output(server.stub.ModelInfer(mlp_request(), timeout=60))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # no cleartext beside TLS
    with grpc.insecure_channel(server.address) as plain, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(plain).ServerLive(pb.ServerLiveRequest(), timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
