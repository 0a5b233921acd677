"""GPU energy of this server: the NVML total-energy counters of every GPU the pod sees, summed.

The counters are read when Prometheus scrapes (on a worker thread, never on the request path), so
the figure is exact at each scrape whatever the interval. `advance` is the pure accounting; NVML
sits behind a `read()` callable so tests inject a fake. Where nothing can be measured (no
nvidia-ml-py, no GPU or driver, a GPU without the counter) the meter says why and reports no
joules at all: a CPU pod must never read as "0 J".
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# One-word reasons: the `reason` label of aidc_server_energy_measured.
NO_NVML = "no_nvml"  # nvidia-ml-py (pynvml) is not installed
NO_GPU = "no_gpu"  # NVML cannot start (no driver: a CPU node) or sees no GPU
UNSUPPORTED = "unsupported"  # a GPU without the total-energy counter (pre-Volta, some MIG setups)
READ_ERROR = "read_error"  # the counter could be read at start but not now (GPU lost)

ReadFn = Callable[[], list[int]]  # millijoules since driver load, one per GPU


class EnergyUnavailable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _one_line(e: BaseException, limit: int = 120) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_nvml(nvml: Any = None) -> ReadFn:
    """A reader of every visible GPU's total-energy counter, or EnergyUnavailable saying why not.

    NVML lists the GPUs the container was given (it ignores CUDA_VISIBLE_DEVICES, which is what
    we want: the pod's energy, whichever device the model runs on).
    """
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")  # the nvidia-ml-py package
        except ImportError:
            raise EnergyUnavailable(NO_NVML, "nvidia-ml-py (pynvml) is not installed") from None
    try:
        nvml.nvmlInit()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded on a CPU node
        raise EnergyUnavailable(NO_GPU, f"NVML: {_one_line(e)}") from None
    if not handles:
        raise EnergyUnavailable(NO_GPU, "NVML sees no GPU")

    def read() -> list[int]:
        return [int(nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in handles]

    try:
        read()
    except Exception as e:
        raise EnergyUnavailable(UNSUPPORTED, f"NVML total energy: {_one_line(e)}") from None
    return read


@dataclass(frozen=True)
class Counters:
    last_mj: tuple[int, ...]  # the raw counters at the last reading
    total_mj: int = 0  # accumulated since the first reading


def advance(state: Counters | None, reading_mj: Sequence[int]) -> Counters:
    """Add the energy between the previous reading and this one.

    The first reading is the baseline, so the total is energy since the server started. A counter
    that went backwards was reset (driver reload) and has counted from zero since. A change in the
    number of GPUs makes this reading a new baseline: a per-GPU difference would be meaningless.
    """
    now = tuple(int(x) for x in reading_mj)
    if state is None:
        return Counters(now)
    if len(now) != len(state.last_mj):
        return Counters(now, state.total_mj)
    delta = sum(cur - prev if cur >= prev else cur for cur, prev in zip(now, state.last_mj, strict=True))
    return Counters(now, state.total_mj + delta)


@dataclass(frozen=True)
class EnergyReading:
    joules: float | None  # None: not measured (never 0 for "unknown")
    reason: str | None  # why not measured; None when measured
    gpus: int = 0


class EnergyMeter:
    """Energy of all visible GPUs since this meter was made. Thread-safe; `sample()` does the I/O."""

    def __init__(self, opener: Callable[[], ReadFn] = open_nvml) -> None:
        self._lock = threading.Lock()
        self._read: ReadFn | None = None
        self._state: Counters | None = None
        self.reason: str | None = None
        try:
            read = opener()
            self._state = advance(None, read())
            self._read = read
        except EnergyUnavailable as e:
            self.reason = e.reason
            log.info("GPU energy not measured (%s): %s", e.reason, e.detail)
        except Exception as e:  # a broken binding must not stop the server from serving
            self.reason = READ_ERROR
            log.warning("GPU energy not measured: %s", _one_line(e))

    def sample(self) -> None:
        """Read the counters now (call off the event loop: NVML is a blocking C library)."""
        if self._read is None:
            return
        with self._lock:
            try:
                self._state = advance(self._state, self._read())
                if self.reason is not None:
                    log.info("GPU energy readable again")
                self.reason = None
            except Exception as e:
                if self.reason is None:
                    log.warning("GPU energy counter unreadable: %s", _one_line(e))
                self.reason = READ_ERROR

    def reading(self) -> EnergyReading:
        with self._lock:
            if self.reason is not None or self._state is None:
                return EnergyReading(None, self.reason or READ_ERROR)
            return EnergyReading(self._state.total_mj / 1000.0, None, len(self._state.last_mj))
