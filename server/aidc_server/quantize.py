"""Optional int8 compression of Linear layers (--quantize int8).

First choice: torch's dynamic quantization (int8 weights, activations quantized per batch at run
time, fbgemm/onednn kernels). torch deprecates torch.ao.quantization in favour of torchao, which
we do not depend on; where it is gone, fall back to weight-only int8 (per-output-channel scales,
torch._weight_int8pack_mm), which keeps the 4x smaller weights without the int8 activation math.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

log = logging.getLogger(__name__)


def quantize_int8(module: nn.Module) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice, once per load, helps nobody
            from torch.ao.quantization import quantize_dynamic

            quantized = quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
        quantized.eval()
        return quantized
    except (ImportError, AttributeError, RuntimeError, NotImplementedError) as e:
        log.warning("dynamic int8 quantization unavailable (%s); using weight-only int8", e)
        return weight_only_int8(module)


class WeightOnlyInt8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def weight_only_int8(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        # MultiheadAttention reads out_proj.weight directly: leave that one alone.
        if isinstance(child, nn.Linear) and not isinstance(child, NonDynamicallyQuantizableLinear):
            setattr(module, name, WeightOnlyInt8Linear(child))
        else:
            weight_only_int8(child)
    return module
