"""The committed gRPC stubs are exactly what grpcio-tools generates from the committed .proto."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

SERVER = Path(__file__).resolve().parents[3] / "server"
PROTO = "aidc_server/proto/grpc_predict_v2.proto"
STUBS = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py")


def test_generated_stubs_match_the_proto(tmp_path):
    args = ["protoc", f"-I{SERVER}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", PROTO]
    assert protoc.main(args) == 0
    for name in STUBS:
        fresh = (tmp_path / "aidc_server" / "proto" / name).read_text()
        committed = (SERVER / "aidc_server" / "proto" / name).read_text()
        assert committed == fresh, (
            f"{name} is stale: regenerate with python -m grpc_tools.protoc -I server --python_out=server"
            f" --grpc_python_out=server {PROTO}"
        )


def test_the_service_is_the_open_inference_protocol_one():
    from aidc_server.proto import grpc_predict_v2_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    ]  # fmt: skip
    # Field numbers are the wire contract with KServe and Triton clients.
    numbers = {f.name: f.number for f in pb.ModelInferRequest.DESCRIPTOR.fields}
    assert numbers == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5, "outputs": 6,
        "raw_input_contents": 7,
    }  # fmt: skip
    contents = {f.name: f.number for f in pb.InferTensorContents.DESCRIPTOR.fields}
    assert contents == {
        "bool_contents": 1, "int_contents": 2, "int64_contents": 3, "uint_contents": 4, "uint64_contents": 5,
        "fp32_contents": 6, "fp64_contents": 7, "bytes_contents": 8,
    }  # fmt: skip
    assert [f.number for f in pb.ModelInferResponse.DESCRIPTOR.fields] == [1, 2, 3, 4, 5, 6]
