"""Under concurrency the server really batches, and batched answers equal unbatched ones."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest
import torch
from server_testkit import LM_SPEC, MLP_SPEC, metric, post_all_at_once, serve_app, wait_for, write_checkpoint

from aidc_server.app import ServingOptions, create_app
from aidc_server.checkpoint_model import CheckpointModel


def body(x: np.ndarray, datatype: str = "FP32") -> dict:
    return {
        "inputs": [
            {"name": "input", "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }


def fire(base: str, path: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    return asyncio.run(post_all_at_once(base, path, [orjson.dumps(b) for b in bodies]))


def outputs(r: httpx.Response | tuple[int, dict]) -> np.ndarray:
    status, doc = (r.status_code, r.json()) if isinstance(r, httpx.Response) else r
    assert status == 200, doc
    out = doc["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    net = write_checkpoint(root, 3, MLP_SPEC, keys=None, seed=4)
    app = create_app(CheckpointModel("mlp", root), ServingOptions(max_batch_size=16, max_latency_ms=50))
    with serve_app(app) as base:
        wait_for(lambda: httpx.get(f"{base}/v2/health/ready").status_code == 200)
        yield base, net


def test_concurrent_requests_are_batched_and_equal_unbatched_predictions(mlp):
    base, net = mlp
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 3, 10)).astype(np.float32) for i in range(48)]

    # Unbatched reference: one request at a time (each is its own batch), and the network itself.
    with httpx.Client(base_url=base, timeout=10) as client:
        alone = [outputs(client.post("/v2/models/mlp/infer", json=body(x))) for x in xs[:8]]
        before = client.get("/metrics").text

    together = [outputs(r) for r in fire(base, "/v2/models/mlp/infer", [body(x) for x in xs])]

    for x, got in zip(xs, together, strict=True):
        with torch.inference_mode():
            np.testing.assert_allclose(got, net(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(alone, together[:8], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    after = httpx.get(f"{base}/metrics").text
    batches = metric(after, "aidc_server_batch_size_count") - metric(before, "aidc_server_batch_size_count")
    rows = metric(after, "aidc_server_batch_size_sum") - metric(before, "aidc_server_batch_size_sum")
    singles = metric(after, "aidc_server_batch_size_bucket", 'le="1.0"') - metric(
        before, "aidc_server_batch_size_bucket", 'le="1.0"'
    )
    assert rows == sum(x.shape[0] for x in xs)
    assert batches < len(xs), f"{len(xs)} requests ran as {batches} batches: no batching happened"
    assert rows / batches > 1.5
    assert singles < batches
    # no batch above the limit: everything sits in buckets <= 16
    assert metric(after, "aidc_server_batch_size_bucket", 'le="16.0"') == metric(
        after, "aidc_server_batch_size_count"
    )


def test_transformer_batches_same_length_requests_and_answers_all(tmp_path):
    net = write_checkpoint(tmp_path, 1, LM_SPEC, keys=None, seed=5)
    app = create_app(CheckpointModel("lm", tmp_path), ServingOptions(max_batch_size=8, max_latency_ms=50))
    rng = np.random.default_rng(8)
    xs = [rng.integers(0, 30, size=(1, 4 + i % 3)) for i in range(18)]  # three lengths
    with serve_app(app) as base:
        wait_for(lambda: httpx.get(f"{base}/v2/health/ready").status_code == 200)
        responses = fire(base, "/v2/models/lm/infer", [body(x, "INT64") for x in xs])
        text = httpx.get(f"{base}/metrics").text
    for x, r in zip(xs, responses, strict=True):
        with torch.inference_mode():
            expected = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(outputs(r), expected, rtol=1e-4, atol=1e-5)
    assert metric(text, "aidc_server_batch_size_count") < len(xs)
