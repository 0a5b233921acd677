"""GPU energy: each rank reads its own device's NVML counter, the ranks' readings are summed, and a job
that cannot measure says why instead of reporting 0. A fake NVML stands in for the driver."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from aidc_trainer.energy import EnergyMeter, job_energy, nvml_ref


class FakeNvml:
    """pynvml's surface the meter uses: four GPUs, NVML index i has UUID GPU-uuid-i; each read of a
    counter adds ``watts`` joules (in millijoules, as NVML counts)."""

    def __init__(self, fail_init: Exception | None = None, no_counter: set[int] = frozenset()) -> None:
        self.fail_init, self.no_counter = fail_init, no_counter
        self.mj = {i: 1_000_000 * (i + 1) for i in range(4)}  # since driver load: not this attempt's
        self.reads: list[int] = []

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.fail_init

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return int(uuid.removeprefix("GPU-uuid-"))

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if h in self.no_counter:
            raise RuntimeError("Not Supported")
        self.reads.append(h)
        self.mj[h] += 100_000 * (h + 1)  # device h draws (h+1) x 100 J between two reads
        return self.mj[h]


def meter(index: int, nvml: Any, environ: dict[str, str], uuid: str | None = None) -> EnergyMeter:
    return EnergyMeter(torch.device("cuda", index), nvml=nvml, environ=environ, uuid=lambda _d: uuid)


def test_torch_device_maps_to_the_nvml_device_it_really_is() -> None:
    # torch's UUID is exact whatever CUDA_VISIBLE_DEVICES says
    assert nvml_ref(0, "58ad-77", {"CUDA_VISIBLE_DEVICES": "3"}) == "GPU-58ad-77"
    assert nvml_ref(0, "GPU-58ad-77", {}) == "GPU-58ad-77"
    # without it: cuda:1 under CUDA_VISIBLE_DEVICES=2,3 is NVML's GPU 3, never NVML index 1
    assert nvml_ref(1, None, {"CUDA_VISIBLE_DEVICES": "2,3"}) == 3
    assert nvml_ref(1, None, {"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b"}) == "GPU-b"
    assert nvml_ref(1, None, {}) == 1  # nothing hidden: the indices agree


def test_each_rank_reads_its_own_device_since_the_attempt_started() -> None:
    nvml = FakeNvml()
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    rank0, rank1 = meter(0, nvml, env), meter(1, nvml, env)  # local ranks 0 and 1 of one node
    assert rank0.reason is None and rank1.reason is None
    assert rank0.joules() == 300.0 and rank1.joules() == 400.0  # GPU 2 and GPU 3, counted from start
    assert nvml.reads == [2, 3, 2, 3]  # never GPU 0 or 1, which belong to another pod
    by_uuid = meter(0, nvml, env, uuid="GPU-uuid-1")
    assert by_uuid.joules() == 200.0 and nvml.reads[-1] == 1


def test_the_job_total_is_the_sum_over_all_ranks() -> None:
    nvml = FakeNvml()
    ranks = [meter(i, nvml, {}) for i in range(4)]
    samples = [m.sample() for m in ranks]  # what each rank puts into the control sync
    summed = [sum(col) for col in zip(*samples, strict=True)]  # what the all-reduce hands rank 0
    assert job_energy(*summed, rank0_reason=None) == {
        "energyJoules": 100.0 + 200 + 300 + 400,
        "energySource": "nvml",
        "energyGpus": 4,
    }


def test_cpu_ranks_report_unavailable_never_zero() -> None:
    cpu = EnergyMeter(torch.device("cpu"), nvml=FakeNvml())
    assert cpu.reason == "no GPU" and cpu.joules() is None and cpu.sample() == [0.0, 0.0, 0.0]
    summed = [sum(col) for col in zip(cpu.sample(), cpu.sample(), strict=True)]
    report = job_energy(*summed, rank0_reason=cpu.reason)
    assert report == {"energyJoules": None, "energySource": "unavailable: no GPU", "energyGpus": 0}


def test_gpus_without_a_usable_counter_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = meter(0, FakeNvml(fail_init=RuntimeError("Driver Not Loaded\nfrom libnvidia-ml.so")), {})
    assert broken.reason == "NVML: Driver Not Loaded" and broken.sample() == [0.0, 0.0, 1.0]
    assert job_energy(*broken.sample(), rank0_reason=broken.reason)["energySource"] == (
        "unavailable: NVML: Driver Not Loaded"
    )
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the binding is not installed
    assert EnergyMeter(torch.device("cuda", 0)).reason == "nvidia-ml-py not installed"
    # one of two GPUs cannot count: a partial sum would pass for the job's total, so none is given
    nvml = FakeNvml(no_counter={1})
    samples = [meter(0, nvml, {}).sample(), meter(1, nvml, {}).sample()]
    summed = [sum(col) for col in zip(*samples, strict=True)]
    report = job_energy(*summed, rank0_reason=None)
    assert report == {
        "energyJoules": None,
        "energySource": "unavailable: NVML on 1 of 2 GPUs only",
        "energyGpus": 1,
    }
