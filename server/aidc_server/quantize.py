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


# Transformer layers with a fused CPU/GPU "fast path" that reads their Linear children's .weight
# tensors directly; with quantized children that path must be off (it is process-wide in torch).
_FUSED = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


def quantizable_linears(module: nn.Module) -> set[str]:
    """Names of the nn.Linear submodules that can be swapped for int8 versions.

    MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear) is read as a raw weight by
    F.multi_head_attention_forward, and its in_proj is a bare Parameter: both stay float.
    """
    return {
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, NonDynamicallyQuantizableLinear)
    }


def quantize_int8(module: nn.Module) -> nn.Module:
    names = quantizable_linears(module)
    if not names:
        raise ValueError("the network has no Linear layer to quantize")
    _no_fused_fast_path(module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice, once per load, helps nobody
            from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

            spec = dict.fromkeys(names, default_dynamic_qconfig)
            quantized = quantize_dynamic(module, spec, dtype=torch.qint8)
        quantized.eval()
        return quantized
    except (ImportError, AttributeError, RuntimeError, NotImplementedError) as e:
        log.warning("dynamic int8 quantization unavailable (%s); using weight-only int8", e)
        return weight_only_int8(module, names)


def _no_fused_fast_path(module: nn.Module) -> None:
    if any(isinstance(m, _FUSED) for m in module.modules()) and torch.backends.mha.get_fastpath_enabled():
        log.info("int8: turning off torch's fused transformer fast path (it needs float Linear weights)")
        torch.backends.mha.set_fastpath_enabled(False)


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


def weight_only_int8(module: nn.Module, names: set[str] | None = None) -> nn.Module:
    names = quantizable_linears(module) if names is None else names
    _no_fused_fast_path(module)
    for name in sorted(names):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, WeightOnlyInt8Linear(getattr(parent, child)))
    return module
