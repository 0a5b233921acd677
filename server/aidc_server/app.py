"""Open Inference Protocol v2 over HTTP (FastAPI). Knows the Model interface, nothing more.

Every client mistake becomes a 4xx with {"error": "..."} naming the problem; a model that is not
loaded (no checkpoint yet, undecryptable, tampered) makes the server live but not ready, and the
reason is in the ready/metadata responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from aidc_server import __version__
from aidc_server.batching import DynamicBatcher, rows
from aidc_server.binary import HEADER, OCTET_STREAM, decode_http_request, encode_binary_response
from aidc_server.energy import EnergyMeter
from aidc_server.errors import ModelNotReady, NotFound, PayloadTooLarge, ServingError
from aidc_server.metrics import CONTENT_TYPE, ServerMetrics
from aidc_server.model import Model
from aidc_server.tensors import encode_response

log = logging.getLogger(__name__)


@dataclass
class ServingOptions:
    max_batch_size: int = 32
    max_latency_ms: float = 5.0
    max_body_bytes: int = 64 * 1024 * 1024  # --max-request-bytes (spec.maxRequestBytes)
    watch_seconds: float = 0.0  # 0: no hot swap; a model that failed to load is still retried
    retry_seconds: float = 5.0


@dataclass
class ServerState:
    """Mutable per-server state shared by the routes, the batcher and the drain logic."""

    model: Model
    options: ServingOptions
    metrics: ServerMetrics
    batcher: DynamicBatcher | None = None
    energy: EnergyMeter | None = None
    draining: bool = False
    arriving: int = 0  # infer requests reading/parsing their body, not yet queued
    in_flight: int = 0  # infer requests anywhere between arrival and response
    tasks: list[asyncio.Task] = field(default_factory=list)
    last_logged_reason: str = ""

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "server is draining (shutting down)"
        if not self.model.ready:
            return self.model.status.reason or "model not loaded"
        return None


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


_LIMIT = "(the server's --max-request-bytes, spec.maxRequestBytes of an InferenceService)"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading it all first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {declared} bytes exceeds the limit of {limit} bytes {_LIMIT}"
            )
        return await request.body()  # the server enforces Content-Length; no need to count
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes {_LIMIT}")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    model: Model, options: ServingOptions | None = None, energy: Callable[[], EnergyMeter] = EnergyMeter
) -> FastAPI:
    """`energy` makes the GPU energy meter at startup (a fake NVML in tests)."""
    options = options or ServingOptions()
    state = ServerState(model=model, options=options, metrics=ServerMetrics(model.name))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.batcher = DynamicBatcher(
            model.predict_versioned,
            max_batch_size=options.max_batch_size,
            max_latency_s=options.max_latency_ms / 1000.0,
            pending_arrivals=lambda: state.arriving,
            on_batch=state.metrics.batch_child.observe,
            allocate=model.host_allocator(),
        )
        state.batcher.start()
        # NVML init and the baseline reading block: off the event loop, before the first request.
        state.energy = await asyncio.to_thread(energy)
        state.metrics.attach_energy(state.energy.reading)
        state.tasks.append(asyncio.create_task(_keep_model_fresh(state), name="aidc-model-loader"))
        yield
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        await state.batcher.close()

    app = FastAPI(title="aidc model server", version=__version__, lifespan=lifespan, openapi_url=None)
    app.state.serving = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown paths and wrong methods: same {"error": ...} shape as everything else.
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> Response:
        return _error(exc.status_code, exc.message)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json({"name": "aidc-server", "version": __version__, "extensions": ["binary_tensor_data"]})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        reason = state.not_ready_reason()
        if reason is None:
            return _json({"ready": True})
        return _json({"ready": False, "reason": reason}, 503)

    def resolve(name: str, version: str | None) -> Model:
        if name != model.name:
            raise NotFound(f"unknown model '{name}'; this server serves '{model.name}'")
        if not model.ready:
            raise ModelNotReady(f"model '{name}' is not ready: {model.status.reason}")
        if version is not None and version != model.version:
            raise NotFound(f"unknown version '{version}' of model '{name}'; serving version {model.version}")
        return model

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return _json(resolve(name, version).metadata())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        try:
            resolve(name, version)
        except ModelNotReady:
            return _json({"name": name, "ready": False, "reason": model.status.reason}, 503)
        if state.draining:
            return _json({"name": name, "ready": False, "reason": state.not_ready_reason()}, 503)
        return _json({"name": name, "ready": True})

    async def infer(request: Request) -> Response:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        started = time.perf_counter()
        code = 200
        state.in_flight += 1
        state.arriving += 1
        try:
            try:
                body = await read_body(request, options.max_body_bytes)
                target = resolve(name, version)
                parsed = decode_http_request(
                    body, request.headers.get("content-type"), request.headers.get(HEADER), target.inputs
                )
                parsed.inputs = target.validate(parsed.inputs)
                target.check_outputs(parsed.outputs)
            finally:
                state.arriving -= 1
            assert state.batcher is not None
            ran_version, outputs = await state.batcher.submit(parsed.inputs)
            state.metrics.inferences_child.inc(rows(parsed.inputs))
            if parsed.outputs is not None:
                outputs = {o: outputs[o] for o in parsed.outputs if o in outputs}
            if any(parsed.wants_binary(o) for o in outputs):
                content, length = encode_binary_response(name, ran_version or "", outputs, parsed)
                return Response(content, media_type=OCTET_STREAM, headers={HEADER: str(length)})
            return Response(
                encode_response(name, ran_version or "", outputs, parsed.id), media_type="application/json"
            )
        except ServingError as e:
            code = e.status_code
            return _error(code, e.message)
        except Exception:
            code = 500
            log.exception("inference failed")
            return _error(500, "internal error during inference (see server log)")
        finally:
            state.in_flight -= 1
            state.metrics.count(code)
            state.metrics.latency_child.observe(time.perf_counter() - started)

    # The hot path is a plain route: FastAPI's dependency solving would cost more than a small
    # model's forward pass, and there is nothing for it to validate that decode_http_request doesn't.
    app.add_route("/v2/models/{name}/infer", infer, methods=["POST"])
    app.add_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])

    @app.get("/metrics")
    async def metrics() -> Response:
        m = state.metrics
        m.queue_depth.labels(model.name).set(state.batcher.queue_depth if state.batcher else 0)
        m.in_flight.labels(model.name).set(state.in_flight)
        if state.energy is not None:
            await asyncio.to_thread(state.energy.sample)  # NVML blocks: keep it off the event loop
        return Response(m.render(), media_type=CONTENT_TYPE)

    return app


async def _keep_model_fresh(state: ServerState) -> None:
    """Load at start (off the event loop); retry while not ready; poll for newer versions if asked."""
    model, options = state.model, state.options
    while True:
        try:
            if not model.ready:
                await asyncio.to_thread(model.load)
            elif options.watch_seconds > 0 and await asyncio.to_thread(model.refresh):
                if state.batcher is not None:
                    state.batcher.forget_timing()
                log.info("model %s now serving version %s", model.name, model.version)
        except Exception:  # load() must not raise, but a bug here must not kill the loop
            log.exception("model load failed unexpectedly")
        state.metrics.set_model(model.version, model.ready)
        reason = model.status.reason
        if not model.ready and reason != state.last_logged_reason:
            log.warning("model %s not ready: %s", model.name, reason)
        state.last_logged_reason = reason if not model.ready else ""
        if model.ready and options.watch_seconds <= 0:
            return
        await asyncio.sleep(options.watch_seconds if model.ready else options.retry_seconds)
