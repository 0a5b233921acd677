"""Open Inference Protocol v2 over gRPC: inference.GRPCInferenceService on grpcio's asyncio server.

It runs on the REST server's event loop and shares its ServerState: the same model, dynamic
batcher (requests of both protocols share batches), metrics, readiness and drain. A client mistake
is INVALID_ARGUMENT or NOT_FOUND with a message naming the field; a model that is not loaded is
UNAVAILABLE; INTERNAL only for a bug in inference itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from aidc_server import __version__
from aidc_server.app import ServerState
from aidc_server.batching import rows
from aidc_server.errors import ModelNotReady, NotFound, ServingError
from aidc_server.grpc_codec import decode_infer_request, encode_infer_response
from aidc_server.model import Model
from aidc_server.proto import grpc_predict_v2_pb2 as pb

log = logging.getLogger(__name__)

SERVER_NAME = "aidc-server"  # as REST GET /v2 reports it
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# For the shared request counter, whose `code` label is an HTTP status: one series per outcome.
_HTTP_STATUS = {code: status for status, code in _CODES.items()} | {grpc.StatusCode.OK: 200}


def grpc_status(error: ServingError) -> grpc.StatusCode:
    return _CODES.get(error.status_code, grpc.StatusCode.INTERNAL)


class InferenceServicer:
    """Thin handlers: the codec decodes, the model validates, the batcher runs."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def resolve(self, name: str, version: str) -> Model:
        """The served model, or NotFound/ModelNotReady worded as the REST API words them."""
        model = self.state.model
        if name != model.name:
            raise NotFound(f"model_name: unknown model '{name}'; this server serves '{model.name}'")
        if not model.ready:
            raise ModelNotReady(f"model '{name}' is not ready: {model.status.reason}")
        if version and version != model.version:
            raise NotFound(
                f"model_version: unknown version '{version}' of model '{name}';"
                f" serving version {model.version}"
            )
        return model

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        # The one readiness truth of REST /v2/health/ready: loaded, verified and not draining.
        return pb.ServerReadyResponse(ready=self.state.not_ready_reason() is None)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        try:
            self.resolve(request.name, request.version)
        except ModelNotReady:
            return pb.ModelReadyResponse(ready=False)
        except ServingError as e:
            await context.abort(grpc_status(e), e.message)
        return pb.ModelReadyResponse(ready=not self.state.draining)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        try:
            doc = self.resolve(request.name, request.version).metadata()
        except ServingError as e:
            await context.abort(grpc_status(e), e.message)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=[tensor(**t) for t in doc["inputs"]],
            outputs=[tensor(**t) for t in doc["outputs"]],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        state = self.state
        started = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        state.in_flight += 1
        state.arriving += 1
        try:
            try:
                target = self.resolve(request.model_name, request.model_version)
                parsed, raw = decode_infer_request(request)
                parsed.inputs = target.validate(parsed.inputs)
                target.check_outputs(parsed.outputs)
            finally:
                state.arriving -= 1
            if state.batcher is None:
                raise ModelNotReady("server is starting")
            ran_version, outputs = await state.batcher.submit(parsed.inputs)
            state.metrics.inferences_child.inc(rows(parsed.inputs))
            if parsed.outputs is not None:
                outputs = {o: outputs[o] for o in parsed.outputs if o in outputs}
            return encode_infer_response(target.name, ran_version or "", outputs, parsed.id, raw)
        except ServingError as e:
            code, message = grpc_status(e), e.message
        except Exception:
            log.exception("inference failed (gRPC)")
            code, message = grpc.StatusCode.INTERNAL, "internal error during inference (see server log)"
        finally:
            state.in_flight -= 1
            state.metrics.count(_HTTP_STATUS.get(code, 500))
            state.metrics.latency_child.observe(time.perf_counter() - started)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")


def method_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """Every RPC of the service, each parsing its own request message.

    grpcio answers a request its deserializer cannot parse with INTERNAL; a malformed message is
    the client's mistake, so the handlers take the bytes and answer INVALID_ARGUMENT themselves.
    """
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(getattr(servicer, method.name), request_type),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _parsing(handler: Callable[[Any, Any], Awaitable[Any]], request_type: type[Message]):
    async def parse_then_handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = request_type.FromString(data)
        except DecodeError as e:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_type.__name__} message: {e}"
            )
        return await handler(request, context)

    return parse_then_handle


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(
    state: ServerState,
    host: str,
    port: int,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> grpc.aio.Server:
    """Bind and start the service on the running event loop; raise if the port cannot be bound."""
    limit = state.options.max_body_bytes  # the REST body limit, for messages: RESOURCE_EXHAUSTED above
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            # grpcio shares a port with any other process by default: a second server would silently
            # take half of the first one's connections. A taken port must fail the start instead.
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((method_handlers(InferenceServicer(state)),))
    address = listen_address(host, port)
    if tls_cert and tls_key:
        credentials = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if not bound:  # older grpcio returns 0 instead of raising
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol v2) listening on %s%s", address, " with TLS" if tls_cert else "")
    return server
