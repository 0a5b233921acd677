"""`python -m aidc_server` as a real process: env configuration, encrypted checkpoint, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import orjson
import torch
from server_testkit import MLP_SPEC, is_ready, make_keys, wait_for, write_checkpoint

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


def slow_body(first_half: bytes, rest: bytes, pause: float):
    yield first_half
    time.sleep(pause)
    yield rest


def test_sigterm_drains_in_flight_requests_then_exits_cleanly(tmp_path, server_process):
    write_checkpoint(tmp_path / "ck", 1, MLP_SPEC, keys=None)
    server = server_process(
        "--checkpoint-dir", str(tmp_path / "ck"), "--model-name", "mlp",
        "--drain-seconds", "0.5", "--drain-timeout-seconds", "20",
    )  # fmt: skip
    wait_for(lambda: is_ready(server.base))
    payload = orjson.dumps(BODY)
    results: list[int] = []

    def in_flight_request() -> None:
        # The body arrives in two parts, 4 s apart: the request is mid-flight when SIGTERM lands.
        body = slow_body(payload[:20], payload[20:], pause=4.0)
        r = httpx.post(f"{server.base}/v2/models/mlp/infer", content=body, timeout=30)
        results.append(r.status_code)

    threads = [threading.Thread(target=in_flight_request) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(
        lambda: 'aidc_server_requests_in_flight{model="mlp"} 4.0' in httpx.get(f"{server.base}/metrics").text
    )

    os.kill(server.proc.pid, signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{server.base}/v2/health/ready").status_code == 503, timeout=5)
    ready = httpx.get(f"{server.base}/v2/health/ready").json()
    assert ready == {"ready": False, "reason": "server is draining (shutting down)"}
    assert httpx.get(f"{server.base}/v2/models/mlp/ready").status_code == 503
    assert httpx.get(f"{server.base}/v2/health/live").status_code == 200
    # still answering during the drain window (the Service may still route here for a moment)
    assert httpx.post(f"{server.base}/v2/models/mlp/infer", json=BODY, timeout=10).status_code == 200

    for t in threads:
        t.join(30)
    assert results == [200, 200, 200, 200]
    assert server.proc.wait(timeout=30) == 0
    log = server.output()
    assert "draining" in log and "drained; shutting down" in log
