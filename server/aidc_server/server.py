"""Process entry: settings -> model -> app -> uvicorn, with a graceful drain on SIGTERM.

Drain: readiness turns false at once (so the Service stops routing here) while the server keeps
answering for --drain-seconds; then it stops accepting connections, lets the requests in flight
finish (at most --drain-timeout-seconds: uvicorn's graceful shutdown) and exits 0. SIGINT or a
second signal skips the drain window.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from types import FrameType

import uvicorn

from aidc_server.app import ServerState, ServingOptions, create_app
from aidc_server.checkpoint_model import CheckpointModel
from aidc_server.config import Settings, parse_args

log = logging.getLogger("aidc_server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_s: float) -> None:
        super().__init__(config)
        self.serving = state
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None

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
    )
    options = ServingOptions(
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
        max_body_bytes=settings.max_body_bytes,
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
    return DrainingServer(config, app.state.serving, settings.drain_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    server = build_server(settings)
    server.run()
    return 0 if server.started else 1
