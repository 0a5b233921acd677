"""Every v2 endpoint over real HTTP, against the trainer's MLP and transformer checkpoints."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from server_testkit import LM_SPEC, MLP_SPEC, metric, serve_app, wait_for, write_checkpoint

from aidc_server.app import ServingOptions, create_app
from aidc_server.checkpoint_model import CheckpointModel

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def mlp_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck-mlp")
    net = write_checkpoint(root, 5, MLP_SPEC, keys=None)
    app = create_app(CheckpointModel("mlp", root), ServingOptions(max_body_bytes=MAX_BODY))
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        yield client, net


def infer_body(x: np.ndarray, name="input", datatype="FP32", **extra) -> dict:
    return {
        "inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}],
        **extra,
    }


def test_server_metadata_and_health(mlp_server):
    client, _ = mlp_server
    assert client.get("/v2").json()["name"] == "aidc-server"
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("path", ["/v2/models/mlp", "/v2/models/mlp/versions/5"])
def test_model_metadata(mlp_server, path):
    client, _ = mlp_server
    r = client.get(path)
    assert r.status_code == 200
    assert r.json() == {
        "name": "mlp",
        "versions": ["5"],
        "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
    }


@pytest.mark.parametrize("path", ["/v2/models/mlp/ready", "/v2/models/mlp/versions/5/ready"])
def test_model_ready(mlp_server, path):
    client, _ = mlp_server
    assert client.get(path).json() == {"name": "mlp", "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/models/mlp/versions/5/infer"])
def test_infer_matches_the_trained_network(mlp_server, path):
    client, net = mlp_server
    x = np.random.default_rng(1).standard_normal((3, 10)).astype(np.float32)
    r = client.post(path, json=infer_body(x, id="req-1"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "mlp" and doc["model_version"] == "5" and doc["id"] == "req-1"
    (out,) = doc["outputs"]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [3, 10]
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(3, 10), expected, rtol=1e-5, atol=1e-6
    )


def test_requested_outputs(mlp_server):
    client, _ = mlp_server
    x = np.zeros((1, 10), np.float32)
    r = client.post("/v2/models/mlp/infer", json=infer_body(x, outputs=[{"name": "output"}]))
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["output"]
    r = client.post("/v2/models/mlp/infer", json=infer_body(x, outputs=[{"name": "probs"}]))
    assert r.status_code == 400 and "unknown output 'probs'" in r.json()["error"]


@pytest.mark.parametrize("name", ["input-0", "input__0", "INPUT"])
def test_single_input_model_accepts_any_input_name(mlp_server, name):
    """KServe-style clients name the tensor `input-0` without reading the metadata."""
    client, net = mlp_server
    x = np.random.default_rng(3).standard_normal((2, 10)).astype(np.float32)
    r = client.post("/v2/models/mlp/infer", json=infer_body(x, name=name))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    got = np.array(out["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # and a wrong shape under that name is still refused, naming the tensor as it was sent
    r = client.post("/v2/models/mlp/infer", json=infer_body(np.zeros((1, 9), np.float32), name=name))
    assert r.status_code == 400 and f"input '{name}': wrong shape [1, 9]" in r.json()["error"]


@pytest.mark.parametrize("name", ["input", "input-0"])
def test_empty_batch_is_400_naming_the_input(mlp_server, name):
    client, _ = mlp_server
    before = metric(client.get("/metrics").text, "aidc_server_requests_total", 'code="500"')
    r = client.post("/v2/models/mlp/infer", json=_tensor([], [0, 10], name=name))
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"input '{name}': empty batch (shape [0, 10]); send at least one row"
    assert metric(client.get("/metrics").text, "aidc_server_requests_total", 'code="500"') == before


def _tensor(data, shape, datatype="FP32", name="input"):
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/v2/models/mlp/infer", b'{"inputs": [', 400, "malformed JSON"),
        ("POST", "/v2/models/mlp/infer", b'"just a string"', 400, "must be a JSON object"),
        (
            "POST",
            "/v2/models/mlp/infer",
            _tensor([0.0] * 12, [2, 6]),
            400,
            "wrong shape [2, 6], expected [-1, 10]",
        ),
        ("POST", "/v2/models/mlp/infer", _tensor([0] * 10, [1, 10], "INT64"), 400, "wrong datatype INT64"),
        ("POST", "/v2/models/mlp/infer", _tensor([0.0] * 9, [1, 10]), 400, "data has 9 elements"),
        ("POST", "/v2/models/mlp/infer", _tensor(["x"] * 10, [1, 10]), 400, "holds strings"),
        (
            "POST",
            "/v2/models/mlp/infer",
            # one input takes any name, but a second tensor has nowhere to go
            {
                "inputs": [
                    *_tensor([0.0] * 10, [1, 10])["inputs"],
                    *_tensor([0.0] * 10, [1, 10], name="pixels")["inputs"],
                ]
            },
            400,
            "unknown input 'pixels'",
        ),
        ("POST", "/v2/models/mlp/infer", _tensor([0.0] * 10, [1, 10], "STRING"), 400, "unsupported datatype"),
        ("POST", "/v2/models/nope/infer", _tensor([0.0] * 10, [1, 10]), 404, "unknown model 'nope'"),
        ("POST", "/v2/models/mlp/versions/4/infer", _tensor([0.0] * 10, [1, 10]), 404, "unknown version '4'"),
        (
            "POST",
            "/v2/models/mlp/infer",
            b"[" + b"0.0," * 20000 + b"0]",
            413,
            "exceeds the limit of 65536 bytes",
        ),
        ("GET", "/v2/models/nope", None, 404, "unknown model 'nope'"),
        ("GET", "/v2/models/nope/ready", None, 404, "unknown model 'nope'"),
        ("GET", "/v2/models/mlp/versions/9", None, 404, "unknown version '9'"),
        ("GET", "/v2/models/mlp/infer", None, 405, "Method Not Allowed"),
        ("GET", "/v3/whatever", None, 404, "Not Found"),
    ],
)
def test_client_errors_are_4xx_naming_the_problem(mlp_server, method, path, body, status, message):
    client, _ = mlp_server
    if isinstance(body, dict):
        r = client.request(method, path, json=body)
    else:
        r = client.request(method, path, content=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_oversized_body_without_content_length_is_refused(mlp_server):
    client, _ = mlp_server

    def chunks():
        for _ in range(40):
            yield b" " * 4096  # chunked transfer: the limit must hold while streaming

    r = client.post("/v2/models/mlp/infer", content=chunks())
    assert r.status_code == 413


def test_metrics(mlp_server):
    client, _ = mlp_server
    client.post("/v2/models/mlp/infer", json=infer_body(np.zeros((2, 10), np.float32)))
    client.post("/v2/models/mlp/infer", content=b"{")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "aidc_server_requests_total", 'code="200"') >= 1
    assert metric(text, "aidc_server_requests_total", 'code="400"') >= 1
    assert metric(text, "aidc_server_requests_total", 'code="500"') == 0
    assert metric(text, "aidc_server_request_latency_seconds_count") >= 2
    assert metric(text, "aidc_server_batch_size_count") >= 1
    assert metric(text, "aidc_server_model_version") == 5
    assert metric(text, "aidc_server_model_ready") == 1
    assert "aidc_server_queue_depth" in text and "aidc_server_requests_in_flight" in text


def test_metrics_count_rows_inferred_and_say_energy_is_not_measured_on_cpu(mlp_server):
    client, _ = mlp_server
    before = metric(client.get("/metrics").text, "aidc_server_inferences_total", 'model="mlp"')
    client.post("/v2/models/mlp/infer", json=infer_body(np.zeros((3, 10), np.float32)))
    client.post("/v2/models/mlp/infer", json=infer_body(np.zeros((2, 10), np.float32)))
    client.post("/v2/models/mlp/infer", json=_tensor([0.0] * 9, [1, 9]))  # refused: not inferred
    text = client.get("/metrics").text
    assert metric(text, "aidc_server_inferences_total", 'model="mlp"') - before == 5
    # No GPU (or no nvidia-ml-py) here: "not measured" with a reason, and no joules at all, not 0.
    measured = [line for line in text.splitlines() if line.startswith("aidc_server_energy_measured")]
    assert len(measured) == 1 and measured[0].endswith(" 0.0"), measured
    assert 'reason="no_gpu"' in measured[0] or 'reason="no_nvml"' in measured[0]
    assert "aidc_server_energy_joules" not in text


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck-lm")
    net = write_checkpoint(root, 7, LM_SPEC, keys=None)
    app = create_app(CheckpointModel("lm", root), ServingOptions(max_latency_ms=20))
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        yield client, net


def test_transformer_tokens_in_logits_out(lm_server):
    client, net = lm_server
    meta = client.get("/v2/models/lm").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, -1, 30]}]
    tokens = np.random.default_rng(2).integers(0, 30, size=(2, 9))
    r = client.post("/v2/models/lm/infer", json=infer_body(tokens, datatype="INT64"))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 9, 30]
    with torch.inference_mode():
        expected = net(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(2, 9, 30), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (np.zeros((0, 5), np.int64), "input 'input': empty batch (shape [0, 5])"),
        (np.full((1, 17), 1), "dimension 1 must be between 1 and 16"),
        (np.full((1, 4), 30), "values must lie in [0, 29]"),
        (np.full((1, 4), -1), "values must lie in [0, 29]"),
    ],
)
def test_transformer_refuses_what_it_cannot_embed(lm_server, tokens, message):
    client, _ = lm_server
    r = client.post("/v2/models/lm/infer", json=infer_body(tokens, datatype="INT64"))
    assert r.status_code == 400 and message in r.json()["error"]
