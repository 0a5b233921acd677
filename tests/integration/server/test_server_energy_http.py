"""GPU energy per inference over real HTTP, with NVML replaced by scripted counters (no GPU here)."""

from __future__ import annotations

import httpx
import numpy as np
from server_testkit import MLP_SPEC, metric, serve_app, wait_for, write_checkpoint

from aidc_server.app import ServingOptions, create_app
from aidc_server.checkpoint_model import CheckpointModel
from aidc_server.energy import EnergyMeter, open_nvml


class ScriptedNvml:
    """pynvml's calls the server makes, over counters the test moves; counts the energy reads."""

    def __init__(self, counters_mj: list[int]) -> None:
        self.counters = counters_mj
        self.reads = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.counters)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        self.reads += 1
        return self.counters[handle]


def test_joules_per_thousand_inferences_from_two_scrapes(tmp_path):
    write_checkpoint(tmp_path, 1, MLP_SPEC, keys=None)
    nvml = ScriptedNvml([5_000_000, 7_000_000])  # two GPUs, mJ since driver load
    app = create_app(
        CheckpointModel("mlp", tmp_path),
        ServingOptions(),
        energy=lambda: EnergyMeter(lambda: open_nvml(nvml)),
    )
    body = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [5, 10], "data": [0.5] * 50}]}
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
        first = client.get("/metrics").text
        assert metric(first, "aidc_server_energy_measured", 'model="mlp"') == 1

        reads = nvml.reads
        for _ in range(4):
            assert client.post("/v2/models/mlp/infer", json=body).status_code == 200
        assert nvml.reads == reads  # NVML is read at scrape time, never on the request path
        nvml.counters[0] += 3_000
        nvml.counters[1] += 1_000
        second = client.get("/metrics").text

    def increase(name: str) -> float:
        return metric(second, name, 'model="mlp"') - metric(first, name, 'model="mlp"')

    joules, rows = increase("aidc_server_energy_joules_total"), increase("aidc_server_inferences_total")
    assert (joules, rows) == (4.0, 20.0)
    # The dashboard's figure: 1000 * increase(joules) / increase(inferences).
    assert np.isclose(1000 * joules / rows, 200.0)
    # Both series carry the same labels, so PromQL divides them without on()/ignoring().
    assert 'aidc_server_energy_joules_total{model="mlp"}' in second
    assert 'aidc_server_inferences_total{model="mlp"}' in second
