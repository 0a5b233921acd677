"""Helpers for the model server's integration tests: real sockets, real processes, no mocks."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
import uvicorn
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from aidc_trainer.checkpoint import save_checkpoint
from aidc_trainer.examples import mlp, transformer_lm
from aidc_trainer.keyring import KeyRing
from cluster_processes import free_port as free_port  # one port picker for every test server

ROOT = Path(__file__).resolve().parents[3]
MLP_SPEC = {"factory": mlp.FACTORY, "config": {"in_features": 10, "hidden": 100, "num_classes": 10}}
LM_SPEC = {
    "factory": transformer_lm.FACTORY,
    "config": {"vocab_size": 30, "d_model": 32, "n_heads": 2, "n_layers": 1, "seq_len": 16},
}


@contextlib.contextmanager
def serve_app(app) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a thread, on a socket bound to a free loopback port."""
    # proto=IPPROTO_TCP, or asyncio skips TCP_NODELAY on accepted sockets (Nagle: 40 ms stalls)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # generous: a loaded machine imports and starts slowly
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("in-process server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.05):
    """Poll until `predicate()` is truthy; the budget only bounds a failure, so it is generous."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def is_ready(base: str, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready", timeout=2, verify=verify).status_code == 200
    except httpx.TransportError:
        return False


def metric(text: str, name: str, labels: str = "") -> float:
    """Value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels or "{" in line else " ")) and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def make_keys(path: Path, key_id: str = "k1", kek_file: Path | None = None) -> Path:
    """A key directory as the operator mounts it; with `kek_file`, the key is RFC 3394-wrapped."""
    path.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    if kek_file is not None:
        kek_file.write_bytes(os.urandom(32))
        key = aes_key_wrap(kek_file.read_bytes(), key)
    (path / f"key-{key_id}").write_bytes(key)
    (path / "current-key-id").write_text(key_id)
    return path


def write_checkpoint(
    root: Path, step: int, spec: dict, keys: Path | None, seed: int = 0, kek_file: Path | None = None
) -> torch.nn.Module:
    """Build the trainer's model from `spec`, save it with the trainer's checkpoint API, return it."""
    from aidc_trainer.checkpoint import build_model_from_manifest

    torch.manual_seed(seed)
    model = build_model_from_manifest({"model": spec}).eval()
    keyring = KeyRing.from_dir(keys, kek_file=kek_file) if keys is not None else None
    result = save_checkpoint(root, step, {"model": model.state_dict()}, keyring=keyring, model_spec=spec)
    assert result.ok, result.error
    return model


class ServerProcess:
    """`python -m aidc_server` as a real child process."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, tls_ca: Path | None = None) -> None:
        self.port = free_port()
        self.base = f"{'https' if tls_ca else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=tls_ca) if tls_ca else True
        pythonpath = os.pathsep.join(str(ROOT / p) for p in ("server", "trainer"))
        self.proc = subprocess.Popen(
            # gRPC off unless a test asks for it (its own --grpc-port, later on the line, wins): tests
            # run side by side, and the default port is one for all of them.
            [*self.command(self.port), *args],
            env={**os.environ, "PYTHONPATH": pythonpath, "AIDC_TORCH_THREADS": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @staticmethod
    def command(port: int) -> list[str]:
        base = [sys.executable, "-m", "aidc_server", "--host", "127.0.0.1", "--port", str(port)]
        return [*base, "--grpc-port", "0"]

    def wait_live(self, timeout: float = 180) -> None:
        def live() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                return (
                    httpx.get(f"{self.base}/v2/health/live", timeout=2, verify=self.verify).status_code == 200
                )
            except httpx.TransportError:
                return False

        wait_for(live, timeout)

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=10)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def post_all_at_once(base: str, path: str, bodies: list[bytes]) -> list[tuple[int, dict]]:
    """Open one connection per body, then write every request back to back and read the answers.

    Unlike a client library's pool, this puts all requests on the wire within a millisecond, so
    the server sees real concurrency even on a loaded 2-core machine.
    """
    import asyncio

    import orjson

    host, port = base.removeprefix("http://").split(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in bodies]
    for (_, writer), body in zip(conns, bodies, strict=True):
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    answers = []
    for reader, writer in conns:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answers.append((int(head[9:12]), orjson.loads(await reader.readexactly(length))))
        writer.close()
    return answers
