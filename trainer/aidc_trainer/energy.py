"""GPU energy of the whole job: each rank reads its own device's NVML total-energy counter, the control
sync sums the readings over ranks, and rank 0 reports the total (docs/contracts.md, `aidc.dev/progress`).

A rank that cannot measure (no GPU, no nvidia-ml-py, a GPU without the counter) says why; the job's
figure is then "unavailable", never 0, so a status never claims a run cost no energy.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger("aidc_trainer.energy")

NO_GPU = "no GPU"


def nvml_ref(torch_index: int, uuid: str | None, environ: Mapping[str, str]) -> str | int:
    """How NVML names the device torch calls ``cuda:<torch_index>``: its UUID, or an NVML index.

    torch's UUID is exact. Without it, CUDA_VISIBLE_DEVICES maps the torch index to what the user
    listed (a UUID, or an index, which NVML shares only under CUDA_DEVICE_ORDER=PCI_BUS_ID). NVML
    itself ignores CUDA_VISIBLE_DEVICES: reading NVML index ``torch_index`` would measure another GPU.
    """
    if uuid:
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if torch_index < len(visible):
        entry = visible[torch_index]
        return int(entry) if entry.isdigit() else entry
    return torch_index


def torch_uuid(device: torch.device) -> str | None:
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # older torch, or no CUDA: the CUDA_VISIBLE_DEVICES mapping decides
        return None


def _one_line(e: BaseException, limit: int = 80) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EnergyMeter:
    """This rank's GPU energy since the meter was made (the start of this attempt), in joules.

    ``nvml``: the pynvml module (a fake in tests); ``reason``: why nothing is measured, or None.
    """

    def __init__(
        self,
        device: torch.device,
        nvml: Any = None,
        environ: Mapping[str, str] | None = None,
        uuid: Callable[[torch.device], str | None] = torch_uuid,
    ) -> None:
        self.gpu = device.type == "cuda"
        self.reason: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._e0 = 0
        if not self.gpu:
            self.reason = NO_GPU
            return
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")  # the nvidia-ml-py package
            except ImportError:
                self.reason = "nvidia-ml-py not installed"
                return
        env = os.environ if environ is None else environ
        try:
            nvml.nvmlInit()
            ref = nvml_ref(device.index or 0, uuid(device), env)
            if isinstance(ref, str):
                handle = nvml.nvmlDeviceGetHandleByUUID(ref)
            else:
                handle = nvml.nvmlDeviceGetHandleByIndex(ref)
            self._e0 = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # millijoules since driver load
        except Exception as e:  # no driver, no counter on this GPU (pre-Volta, MIG): say so
            self.reason = f"NVML: {_one_line(e)}"
            log.info("GPU energy not measured on %s: %s", device, self.reason)
            return
        self._nvml, self._handle = nvml, handle

    @property
    def measuring(self) -> bool:
        return self._nvml is not None

    def joules(self) -> float | None:
        if self._nvml is None:
            return None
        try:
            return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._e0) / 1000.0
        except Exception as e:  # the GPU fell off the bus: stop claiming a figure
            self.reason = f"NVML: {_one_line(e)}"
            self._nvml = None
            return None

    def sample(self) -> list[float]:
        """This rank's share of the control sync: [joules, measured (0/1), GPUs (0/1)]."""
        j = self.joules()
        return [j or 0.0, float(j is not None), float(self.gpu)]


def job_energy(joules: float, measured: float, gpus: float, rank0_reason: str | None) -> dict[str, Any]:
    """The progress report's energy fields from the sums over ranks of :meth:`EnergyMeter.sample`."""
    measured, gpus = round(measured), round(gpus)  # counts, summed exactly in float64
    if gpus == 0:
        return {"energyJoules": None, "energySource": f"unavailable: {NO_GPU}", "energyGpus": 0}
    if measured == gpus:
        return {"energyJoules": round(joules, 1), "energySource": "nvml", "energyGpus": measured}
    # A partial sum would read as the job's total: report none, and why.
    reason = rank0_reason if measured == 0 and rank0_reason else f"NVML on {measured} of {gpus} GPUs only"
    return {"energyJoules": None, "energySource": f"unavailable: {reason}", "energyGpus": measured}
