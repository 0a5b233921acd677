"""Where the model runs and in which precision: --device auto|cpu|cuda, --precision fp32|bf16|fp16.

`choose_placement` is a pure decision (tested without a GPU); `Placement` moves a network there,
moves each batch there and gives the batcher its host buffers: page-locked (pinned) memory on a
GPU, so a batch is assembled once in memory the GPU can read directly and copied in one transfer;
plain numpy memory on the CPU, where there is nothing to copy. The CPU path runs the same code with
the device set to CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# The batcher asks this for each batch buffer: (shape, dtype) -> array it fills.
Allocator = Callable[[tuple[int, ...], np.dtype], np.ndarray]
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PlacementError(ValueError):
    """A device/precision/quantization combination that cannot serve; the message says why."""


@dataclass(frozen=True)
class Placement:
    device: str = "cpu"  # a torch device string: "cpu" or "cuda:0"
    precision: str = "fp32"

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def describe(self) -> str:
        if not self.on_gpu:
            return f"cpu, {self.precision}"
        return f"{self.device} ({torch.cuda.get_device_name(self.device)}), {self.precision}"

    def place_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move parameters and buffers to the device; cast the floating-point ones (not int8)."""
        if self.precision == "fp32":
            return module.to(device=self.device)
        return module.to(device=self.device, dtype=self.dtype)

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """One host->device copy of a batch input; float inputs take the serving precision."""
        if not array.flags.writeable:  # a view of a binary request body; torch wants writable memory
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.on_gpu:
            # Pinned source (the batcher's buffer): the copy is a DMA that needs no staging.
            tensor = tensor.to(self.device, non_blocking=tensor.is_pinned())
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        return tensor

    def to_host(self, tensor: torch.Tensor, dtype: np.dtype | None) -> np.ndarray:
        """An output back as numpy, in the signature's datatype (bf16/fp16 logits widen to fp32)."""
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != _torch_dtype(dtype):
            tensor = tensor.to(_torch_dtype(dtype))
        return tensor.cpu().numpy()

    def host_allocator(self) -> Allocator | None:
        """How the batcher allocates a batch: pinned buffers on a GPU; None keeps numpy's default."""
        if not self.on_gpu:
            return None

        def pinned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            if dtype.kind == "O":  # BYTES: no torch dtype; never reaches a network anyway
                return np.empty(shape, dtype)
            # Torch's caching host allocator reuses pinned blocks, so this is cheap after warm-up.
            # The numpy view keeps the tensor (and its pinned block) alive until the batch is done.
            return torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=True).numpy()

        return pinned


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def choose_placement(
    device: str, precision: str, quantize: str | None, cuda_available: bool, visible: str | None = None
) -> Placement:
    """auto: the GPU when CUDA sees one (the device plugin sets CUDA_VISIBLE_DEVICES), else the CPU."""
    if device not in DEVICES:
        raise PlacementError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if precision not in PRECISIONS:
        raise PlacementError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device == "cuda" and not cuda_available:
        raise PlacementError(
            f"--device cuda but no CUDA device is usable (CUDA_VISIBLE_DEVICES={visible!r}, "
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu or auto"
        )
    use_gpu = device == "cuda" or (device == "auto" and cuda_available)
    if quantize == "int8":
        if use_gpu:
            raise PlacementError(
                "--quantize int8 runs on the CPU only (torch's dynamic int8 kernels have no CUDA version); "
                "on a GPU serve with --precision bf16 or fp16 instead, or set --device cpu"
            )
        if precision != "fp32":
            raise PlacementError(
                f"--quantize int8 computes in int8/fp32; it does not combine with {precision}"
            )
    return Placement("cuda:0" if use_gpu else "cpu", precision)


def placement_from_settings(device: str, precision: str, quantize: str | None) -> Placement:
    """choose_placement for this process (asks torch whether CUDA is usable)."""
    cuda = device != "cpu" and torch.cuda.is_available()
    return choose_placement(device, precision, quantize, cuda, os.environ.get("CUDA_VISIBLE_DEVICES"))
