"""Loading from aidc checkpoints: encrypted, tampered, undecryptable, absent, and hot swap."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch
from server_testkit import LM_SPEC, MLP_SPEC, make_keys, serve_app, wait_for, write_checkpoint

from aidc_server.app import ServingOptions, create_app
from aidc_server.checkpoint_model import CheckpointModel

X = np.random.default_rng(3).standard_normal((2, 10)).astype(np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 10], "data": X.ravel().tolist()}]}


def expected(net: torch.nn.Module) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(X)).numpy()


def served(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 10)


def start(model: CheckpointModel, **options):
    return serve_app(create_app(model, ServingOptions(retry_seconds=0.1, **options)))


def assert_not_ready(client: httpx.Client, *fragments: str) -> str:
    """Live, not ready, the reason in every model endpoint, and no inference."""
    assert client.get("/v2/health/live").status_code == 200
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    reason = ready.json()["reason"]
    for fragment in fragments:
        assert fragment in reason, reason
    model_ready = client.get("/v2/models/mlp/ready")
    assert model_ready.status_code == 503 and model_ready.json()["reason"] == reason
    meta = client.get("/v2/models/mlp")
    assert meta.status_code == 503 and reason in meta.json()["error"]
    infer = client.post("/v2/models/mlp/infer", json=BODY)
    assert infer.status_code == 503 and "not ready" in infer.json()["error"]
    return reason


def test_encrypted_checkpoint_with_wrapped_key_is_served(tmp_path):
    kek = tmp_path / "kek"
    keys = make_keys(tmp_path / "keys", kek_file=kek)
    net = write_checkpoint(tmp_path / "ck", 40, MLP_SPEC, keys, seed=1, kek_file=kek)
    raw = (tmp_path / "ck" / "step-000000040" / "rank-0.bin").read_bytes()
    assert raw.startswith(b"AIDCGCM1")  # really encrypted on disk
    model = CheckpointModel("mlp", tmp_path / "ck", key_dir=keys, kek_file=kek)
    with start(model) as base, httpx.Client(base_url=base, timeout=10) as client:
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        r = client.post("/v2/models/mlp/infer", json=BODY)
        assert r.json()["model_version"] == "40"
        np.testing.assert_allclose(served(r), expected(net), rtol=1e-5, atol=1e-6)


def tamper(path, offset_from_end: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_checkpoint_is_refused_with_the_reason(tmp_path):
    keys = make_keys(tmp_path / "keys")
    write_checkpoint(tmp_path / "ck", 10, MLP_SPEC, keys)
    tamper(tmp_path / "ck" / "step-000000010" / "rank-0.bin")
    model = CheckpointModel("mlp", tmp_path / "ck", key_dir=keys)
    with start(model) as base, httpx.Client(base_url=base, timeout=10) as client:
        wait_for(lambda: "refused" in client.get("/v2/health/ready").json().get("reason", ""))
        reason = assert_not_ready(client, "step-000000010", "refused")
        assert "no checkpoint passed verification" in reason
        metrics = client.get("/metrics").text
        assert 'aidc_server_model_ready{model="mlp"} 0.0' in metrics
        assert 'aidc_server_model_version{model="mlp"} -1.0' in metrics


def test_tampered_newest_falls_back_to_the_newest_that_verifies(tmp_path):
    keys = make_keys(tmp_path / "keys")
    older = write_checkpoint(tmp_path / "ck", 10, MLP_SPEC, keys, seed=1)
    write_checkpoint(tmp_path / "ck", 20, MLP_SPEC, keys, seed=2)
    tamper(tmp_path / "ck" / "step-000000020" / "rank-0.bin", offset_from_end=100)
    with (
        start(CheckpointModel("mlp", tmp_path / "ck", key_dir=keys)) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        r = client.post("/v2/models/mlp/infer", json=BODY)
        assert r.json()["model_version"] == "10"
        np.testing.assert_allclose(served(r), expected(older), rtol=1e-5, atol=1e-6)


def test_wrong_key_is_not_ready_and_says_so(tmp_path):
    write_checkpoint(tmp_path / "ck", 10, MLP_SPEC, make_keys(tmp_path / "keys"))
    other = make_keys(tmp_path / "other-keys")  # same key id, different bytes
    with (
        start(CheckpointModel("mlp", tmp_path / "ck", key_dir=other)) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        wait_for(lambda: client.get("/v2/health/ready").json().get("reason", "").startswith("cannot decrypt"))
        reason = assert_not_ready(client, "cannot decrypt")
        assert (tmp_path / "other-keys" / "key-k1").read_bytes().hex() not in reason


def test_encrypted_checkpoint_without_keys_is_not_ready(tmp_path):
    write_checkpoint(tmp_path / "ck", 10, MLP_SPEC, make_keys(tmp_path / "keys"))
    with (
        start(CheckpointModel("mlp", tmp_path / "ck")) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        wait_for(lambda: "cannot decrypt" in client.get("/v2/health/ready").json().get("reason", ""))
        assert_not_ready(client, "cannot decrypt")


def test_no_checkpoint_yet_then_one_appears(tmp_path):
    root = tmp_path / "ck"
    with start(CheckpointModel("mlp", root)) as base, httpx.Client(base_url=base, timeout=10) as client:
        wait_for(lambda: client.get("/v2/health/ready").json().get("reason"))
        assert_not_ready(client, "does not exist")
        root.mkdir()
        wait_for(lambda: "no checkpoint" in client.get("/v2/health/ready").json().get("reason", ""))
        net = write_checkpoint(root, 1, MLP_SPEC, keys=None)
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        np.testing.assert_allclose(
            served(client.post("/v2/models/mlp/infer", json=BODY)), expected(net), rtol=1e-5, atol=1e-6
        )


def test_hot_swap_to_a_newer_checkpoint_drops_no_request(tmp_path):
    root = tmp_path / "ck"
    keys = make_keys(tmp_path / "keys")
    old = write_checkpoint(root, 1, MLP_SPEC, keys, seed=1)
    model = CheckpointModel("mlp", root, key_dir=keys)
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    with start(model, watch_seconds=0.1) as base:

        def hammer() -> None:
            with httpx.Client(base_url=base, timeout=10) as client:
                while not stop.is_set():
                    r = client.post("/v2/models/mlp/infer", json=BODY)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.append(r.json()["model_version"])

        with httpx.Client(base_url=base, timeout=10) as client:
            wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
            np.testing.assert_allclose(
                served(client.post("/v2/models/mlp/infer", json=BODY)), expected(old), rtol=1e-5, atol=1e-6
            )
            threads = [threading.Thread(target=hammer) for _ in range(3)]
            for t in threads:
                t.start()
            wait_for(lambda: len(statuses) > 20)
            new = write_checkpoint(root, 2, MLP_SPEC, keys, seed=2)
            wait_for(lambda: client.get("/v2/models/mlp").json()["versions"] == ["2"])
            wait_for(lambda: versions and versions[-1] == "2")
            stop.set()
            for t in threads:
                t.join()
            r = client.post("/v2/models/mlp/versions/2/infer", json=BODY)
            np.testing.assert_allclose(served(r), expected(new), rtol=1e-5, atol=1e-6)
            assert client.post("/v2/models/mlp/versions/1/infer", json=BODY).status_code == 404
            metrics = client.get("/metrics").text
    assert set(statuses) == {200}, statuses
    assert versions[0] == "1" and versions[-1] == "2"
    assert 'aidc_server_model_version{model="mlp"} 2.0' in metrics


def test_newer_tampered_checkpoint_is_not_swapped_in(tmp_path):
    root = tmp_path / "ck"
    keys = make_keys(tmp_path / "keys")
    old = write_checkpoint(root, 1, MLP_SPEC, keys, seed=1)
    model = CheckpointModel("mlp", root, key_dir=keys)
    with (
        start(model, watch_seconds=0.1) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        # Tamper before it appears (the watcher must never see the good bytes), then publish it
        # with one rename, as the trainer does.
        staging = tmp_path / "staging"
        write_checkpoint(staging, 2, MLP_SPEC, keys, seed=2)
        tamper(staging / "step-000000002" / "rank-0.bin")
        (staging / "step-000000002").rename(root / "step-000000002")
        wait_for(lambda: 2 in model.refused_steps)  # the watcher saw it and refused it
        assert client.get("/v2/health/ready").status_code == 200
        r = client.post("/v2/models/mlp/infer", json=BODY)
        assert r.json()["model_version"] == "1"
        np.testing.assert_allclose(served(r), expected(old), rtol=1e-5, atol=1e-6)


def test_int8_quantized_mlp_stays_close(tmp_path):
    net = write_checkpoint(tmp_path / "ck", 3, MLP_SPEC, keys=None, seed=6)
    with (
        start(CheckpointModel("mlp", tmp_path / "ck", quantize="int8")) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        got = served(client.post("/v2/models/mlp/infer", json=BODY))
    want = expected(net)
    assert not np.array_equal(got, want)  # it really is a different (quantized) network
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.fixture
def restore_mha_fastpath():
    enabled = torch.backends.mha.get_fastpath_enabled()
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


def test_int8_quantized_transformer_runs_and_stays_close(tmp_path, restore_mha_fastpath):
    net = write_checkpoint(tmp_path / "ck", 3, LM_SPEC, keys=None, seed=6)
    tokens = np.random.default_rng(4).integers(0, 30, size=(2, 12))
    body = {
        "inputs": [{"name": "input", "datatype": "INT64", "shape": [2, 12], "data": tokens.ravel().tolist()}]
    }
    with (
        start(CheckpointModel("lm", tmp_path / "ck", quantize="int8")) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        r = client.post("/v2/models/lm/infer", json=body)
    assert r.status_code == 200, r.text
    got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 12, 30)
    with torch.inference_mode():
        want = net(torch.from_numpy(tokens)).numpy()
    assert not np.array_equal(got, want)
    np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
