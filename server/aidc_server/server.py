"""Process entry: settings -> model -> app -> uvicorn (+ gRPC on the same loop), with a graceful drain.

Drain: readiness turns false at once (so the Service stops routing here) while the server keeps
answering for --drain-seconds; then it stops accepting connections, lets the requests in flight
finish (at most --drain-timeout-seconds: uvicorn's graceful shutdown) and exits 0. SIGINT or a
second signal skips the drain window. The gRPC service (grpc_api) follows the same steps: not ready,
then refusing new calls, then finishing those in flight.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType

import grpc
import uvicorn

from aidc_server.app import ServerState, ServingOptions, create_app
from aidc_server.checkpoint_model import CheckpointModel
from aidc_server.config import Settings, parse_args
from aidc_server.device import PlacementError, placement_from_settings
from aidc_server.grpc_api import start_grpc_server
from aidc_trainer.model_registry import ModelRegistry, parse_allowlist

log = logging.getLogger("aidc_server")


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        state: ServerState,
        drain_s: float,
        start_grpc: Callable[[], Awaitable[grpc.aio.Server]] | None = None,
    ) -> None:
        super().__init__(config)
        self.serving = state
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self.start_grpc = start_grpc
        self.grpc: grpc.aio.Server | None = None
        self.failed = False

    async def startup(self, sockets=None) -> None:  # type: ignore[override]
        await super().startup(sockets)
        if not self.should_exit and self.start_grpc is not None:
            # After the lifespan startup, so a gRPC call never finds the batcher missing.
            try:
                self.grpc = await self.start_grpc()
            except Exception as e:
                log.error("cannot serve gRPC: %s", e)
                self.failed = True
                self.should_exit = True
        # torch, FastAPI and grpc leave ~220k long-lived objects that every full collection walks
        # (~100 ms on one core), pausing every request in flight: at a few thousand requests/s that
        # was the p99 at 64 connections (docs/benchmarks.md, serving run 8). They live as long as the
        # process, so take them out of the collector's view.
        gc.freeze()

    async def shutdown(self, sockets=None) -> None:  # type: ignore[override]
        if self.grpc is not None:
            # gRPC refuses new calls now, with HTTP's listener; its calls in flight get the same
            # grace. As one of uvicorn's tasks it is awaited before the lifespan shutdown closes
            # the batcher those calls still need.
            stopping = asyncio.create_task(self.grpc.stop(self.config.timeout_graceful_shutdown))
            self.server_state.tasks.add(stopping)  # type: ignore[arg-type]
            stopping.add_done_callback(self.server_state.tasks.discard)  # type: ignore[arg-type]
        await super().shutdown(sockets)

    async def serve(self, sockets=None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after shutdown, and a drained
        # server should exit 0, not die of SIGTERM.
        if sig == signal.SIGTERM and not self.serving.draining and not self.should_exit and self._loop:
            self.serving.draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    def _start_drain(self) -> None:
        assert self._loop is not None
        self.serving.tasks.append(self._loop.create_task(self._drain(), name="aidc-drain"))

    async def _drain(self) -> None:
        log.info("SIGTERM: draining (not ready; serving %.1fs more, then finishing in-flight)", self.drain_s)
        await asyncio.sleep(self.drain_s)
        # uvicorn's shutdown closes the listening socket (new connections are refused), closes idle
        # keep-alive connections and waits up to timeout_graceful_shutdown for the rest.
        log.info(
            "drain window over; refusing new connections, finishing %d in-flight requests",
            self.serving.in_flight,
        )
        self.should_exit = True


def build_server(settings: Settings) -> DrainingServer:
    model = CheckpointModel(
        settings.model_name,
        settings.checkpoint_dir,
        key_dir=settings.key_dir,
        kek_file=settings.kek_file,
        quantize=settings.quantize,
        registry=ModelRegistry(parse_allowlist(settings.model_factories)),
    )
    model.placement = placement_from_settings(settings.device, settings.precision, settings.quantize)
    log.info("model %s will run on %s", model.name, model.placement.describe())
    options = ServingOptions(
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
        max_body_bytes=settings.max_request_bytes,
        watch_seconds=settings.watch_seconds,
        retry_seconds=settings.retry_seconds,
    )
    app = create_app(model, options)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # per-request logging costs more than the inference of a small model
        lifespan="on",
        # A float works (asyncio.wait_for); int() would turn 0.5 into 0, which uvicorn reads as "forever".
        timeout_graceful_shutdown=max(settings.drain_timeout_seconds, 0.001),  # type: ignore[arg-type]
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
    )
    state = app.state.serving
    start_grpc = None
    if settings.grpc_port:
        start_grpc = functools.partial(
            start_grpc_server, state, settings.host, settings.grpc_port, settings.tls_cert, settings.tls_key
        )
    return DrainingServer(config, state, settings.drain_seconds, start_grpc)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        server = build_server(settings)
    except PlacementError as e:  # e.g. --quantize int8 on a GPU: say why, as a bad flag would
        log.error("%s", e)
        return 2
    server.run()
    return 0 if server.started and not server.failed else 1
