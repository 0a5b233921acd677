"""`python -m aidc_server` as a real process: env configuration, encrypted checkpoint, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import torch
from server_testkit import MLP_SPEC, is_ready, make_keys, metric, wait_for, write_checkpoint

from tests.tls import serving_cert

X = np.random.default_rng(11).standard_normal((4, 10)).astype(np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 10], "data": X.ravel().tolist()}]}


def test_encrypted_checkpoint_end_to_end_over_tls_from_environment(tmp_path, server_process):
    kek = tmp_path / "kek" / "kek"
    kek.parent.mkdir()
    keys = make_keys(tmp_path / "keys", key_id="2026-11", kek_file=kek)
    net = write_checkpoint(tmp_path / "ck", 300, MLP_SPEC, keys, seed=9, kek_file=kek)
    scratch = tmp_path / "scratch"  # the server's TMPDIR: decrypted weights must not land here
    scratch.mkdir()
    tls = serving_cert(tmp_path / "tls")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    server = server_process(
        tls_ca=tls.ca_file,
        env={
            "AIDC_CHECKPOINT_DIR": str(tmp_path / "ck"),
            "AIDC_KEY_DIR": str(keys),
            "AIDC_KEK_FILE": str(kek),
            "AIDC_MODEL_NAME": "classifier",
            "AIDC_TLS_CERT": str(tls.cert_file),
            "AIDC_TLS_KEY": str(tls.key_file),
            "TMPDIR": str(scratch),
        },
    )
    wait_for(lambda: is_ready(server.base, server.verify))
    assert server.base.startswith("https://")
    r = httpx.post(
        f"{server.base}/v2/models/classifier/versions/300/infer", json=BODY, timeout=10, verify=server.verify
    )
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    with torch.inference_mode():
        want = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(4, 10), want, rtol=1e-5, atol=1e-6)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    server.stop()
    log = server.output()
    assert "serving step 300" in log
    assert kek.read_bytes().hex() not in log and (keys / "key-2026-11").read_bytes().hex() not in log


class GatedBody:
    """A request body whose second half goes out only when the test opens the gate.

    The request is in flight (headers and part of the body received) for as long as the test
    wants, whatever the machine's speed: no sleeps, no wall-clock budgets.
    """

    def __init__(self, payload: bytes, gate: threading.Event) -> None:
        self.payload = payload
        self.gate = gate

    def __iter__(self) -> Iterator[bytes]:
        yield self.payload[:20]
        self.gate.wait()
        yield self.payload[20:]


def refuses_connections(base: str) -> bool:
    """No new request is answered: the connection is refused, or (racing the listener's close) it was
    still in the accept backlog and is reset unanswered."""
    try:
        httpx.get(f"{base}/v2/health/live", timeout=10)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


def test_sigterm_drains_in_flight_requests_then_exits_cleanly(tmp_path, server_process):
    net = write_checkpoint(tmp_path / "ck", 1, MLP_SPEC, keys=None)
    server = server_process(
        "--checkpoint-dir", str(tmp_path / "ck"), "--model-name", "mlp",
        "--drain-seconds", "0", "--drain-timeout-seconds", "600",
    )  # fmt: skip
    wait_for(lambda: is_ready(server.base))
    gate = threading.Event()
    answers: list[httpx.Response] = []

    def in_flight_request() -> None:
        body = GatedBody(orjson.dumps(BODY), gate)
        answers.append(httpx.post(f"{server.base}/v2/models/mlp/infer", content=body, timeout=600))

    threads = [threading.Thread(target=in_flight_request) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        wait_for(
            lambda: metric(httpx.get(f"{server.base}/metrics").text, "aidc_server_requests_in_flight") == 3
        )
        os.kill(server.proc.pid, signal.SIGTERM)
        # Drain window (0 s) over: the listener is closed, so new requests are refused ...
        wait_for(lambda: refuses_connections(server.base))
        # ... while the held requests are neither answered nor dropped, and the process waits for them.
        assert answers == [] and all(t.is_alive() for t in threads)
        assert server.proc.poll() is None
    finally:
        gate.set()
    for t in threads:
        t.join(600)
    with torch.inference_mode():
        want = net(torch.from_numpy(X)).numpy()
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    for r in answers:
        got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(4, 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert server.proc.wait(timeout=120) == 0
    log = server.output()
    assert "draining" in log and "drain window over" in log
    assert "Cancel" not in log  # uvicorn's "timeout graceful shutdown exceeded" never happened


def test_sigterm_turns_unready_but_keeps_serving_through_the_drain_window(tmp_path, server_process):
    write_checkpoint(tmp_path / "ck", 1, MLP_SPEC, keys=None)
    server = server_process(
        "--checkpoint-dir", str(tmp_path / "ck"), "--model-name", "mlp",
        "--drain-seconds", "3600", "--drain-timeout-seconds", "600",
    )  # fmt: skip
    wait_for(lambda: is_ready(server.base))

    os.kill(server.proc.pid, signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{server.base}/v2/health/ready", timeout=10).status_code == 503)
    ready = httpx.get(f"{server.base}/v2/health/ready", timeout=10).json()
    assert ready == {"ready": False, "reason": "server is draining (shutting down)"}
    assert httpx.get(f"{server.base}/v2/models/mlp/ready", timeout=10).status_code == 503
    assert httpx.get(f"{server.base}/v2/health/live", timeout=10).status_code == 200
    # still answering during the drain window (the Service may still route here for a moment)
    assert httpx.post(f"{server.base}/v2/models/mlp/infer", json=BODY, timeout=60).status_code == 200

    os.kill(server.proc.pid, signal.SIGTERM)  # a second signal skips the rest of the window
    assert server.proc.wait(timeout=120) == 0
