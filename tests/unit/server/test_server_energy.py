"""GPU energy accounting of the server: pure arithmetic over NVML counters, and what it exports."""

from __future__ import annotations

import sys

import pytest

from aidc_server.energy import (
    NO_GPU,
    NO_NVML,
    READ_ERROR,
    UNSUPPORTED,
    Counters,
    EnergyMeter,
    EnergyReading,
    EnergyUnavailable,
    advance,
    open_nvml,
)
from aidc_server.metrics import ServerMetrics


def test_first_reading_is_the_baseline_then_energy_sums_over_gpus():
    state = advance(None, [10_000, 500_000])  # mJ since driver load: not ours
    assert state.total_mj == 0
    state = advance(state, [12_000, 503_500])
    assert state == Counters((12_000, 503_500), 5_500)
    assert advance(state, [12_000, 503_500]).total_mj == 5_500  # idle: nothing added


def test_a_counter_that_went_backwards_was_reset_and_counts_from_zero():
    state = advance(Counters((9_000, 9_000), 1_000), [400, 9_100])  # GPU 0's driver reloaded
    assert state.total_mj == 1_000 + 400 + 100


def test_a_changed_set_of_gpus_is_a_new_baseline_keeping_the_total():
    state = advance(Counters((9_000,), 1_000), [50, 70])
    assert state == Counters((50, 70), 1_000)
    assert advance(state, [60, 90]).total_mj == 1_030


class FakeNvml:
    """The few pynvml calls the server makes, over scripted per-GPU counters (mJ)."""

    def __init__(self, counters: list[int], init_error: Exception | None = None, energy_error=None):
        self.counters = counters
        self.init_error = init_error
        self.energy_error = energy_error

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlDeviceGetCount(self):
        return len(self.counters)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.energy_error:
            raise self.energy_error
        return self.counters[handle]


def test_open_nvml_reads_every_visible_gpu():
    nvml = FakeNvml([1_000, 2_000, 3_000])
    read = open_nvml(nvml)
    nvml.counters[2] += 7
    assert read() == [1_000, 2_000, 3_007]


@pytest.mark.parametrize(
    ("nvml", "reason"),
    [
        (FakeNvml([], init_error=RuntimeError("NVML Shared Library Not Found")), NO_GPU),
        (FakeNvml([]), NO_GPU),
        (FakeNvml([5], energy_error=RuntimeError("Not Supported")), UNSUPPORTED),
    ],
)
def test_open_nvml_says_why_it_cannot_measure(nvml, reason):
    with pytest.raises(EnergyUnavailable) as e:
        open_nvml(nvml)
    assert e.value.reason == reason


def test_without_nvidia_ml_py_the_reason_is_no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    meter = EnergyMeter()
    assert meter.reading() == EnergyReading(None, NO_NVML)


def test_meter_reports_joules_since_it_was_made():
    nvml = FakeNvml([70_000, 80_000])
    meter = EnergyMeter(lambda: open_nvml(nvml))
    meter.sample()
    assert meter.reading() == EnergyReading(0.0, None, 2)  # measured, and really nothing yet
    nvml.counters[0] += 1_500
    nvml.counters[1] += 2_500
    meter.sample()
    assert meter.reading() == EnergyReading(4.0, None, 2)


def test_cpu_pod_says_not_measured_never_zero_joules():
    def no_gpu():
        raise EnergyUnavailable(NO_GPU, "NVML: Driver Not Loaded")

    meter = EnergyMeter(no_gpu)
    meter.sample()
    assert meter.reading() == EnergyReading(None, NO_GPU)


def test_a_counter_lost_mid_run_stops_the_figure_and_recovers_with_the_gap_counted():
    nvml = FakeNvml([1_000])
    meter = EnergyMeter(lambda: open_nvml(nvml))
    nvml.energy_error = RuntimeError("GPU is lost")
    nvml.counters[0] += 3_000
    meter.sample()
    assert meter.reading() == EnergyReading(None, READ_ERROR)
    nvml.energy_error = None
    meter.sample()
    assert meter.reading() == EnergyReading(3.0, None, 1)


def test_exported_series_measured():
    metrics = ServerMetrics("mlp")
    metrics.attach_energy(lambda: EnergyReading(12.5, None, 2))
    metrics.inferences_child.inc(4)
    text = metrics.render().decode()
    assert 'aidc_server_energy_measured{model="mlp"} 1.0' in text
    assert 'aidc_server_energy_joules_total{model="mlp"} 12.5' in text
    assert "# TYPE aidc_server_energy_joules_total counter" in text
    assert 'aidc_server_inferences_total{model="mlp"} 4.0' in text


def test_exported_series_not_measured_has_a_reason_and_no_joules():
    metrics = ServerMetrics("mlp")
    metrics.attach_energy(lambda: EnergyReading(None, NO_GPU))
    text = metrics.render().decode()
    assert 'aidc_server_energy_measured{model="mlp",reason="no_gpu"} 0.0' in text
    assert "aidc_server_energy_joules" not in text
