"""Device and precision: the choice (pure, no GPU needed) and the CPU run of the same placement code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aidc_server.batching import concat
from aidc_server.device import Placement, PlacementError, choose_placement
from aidc_server.model import LoadedNetwork, TorchModel, infer_signature


@pytest.mark.parametrize(
    ("device", "cuda", "expected"),
    [("auto", True, "cuda:0"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cuda", True, "cuda:0")],
)
def test_auto_takes_the_gpu_when_cuda_sees_one(device, cuda, expected):
    assert choose_placement(device, "bf16", None, cuda_available=cuda).device == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cuda", "fp32", None, False, "0"), "no CUDA device is usable (CUDA_VISIBLE_DEVICES='0'"),
        (("auto", "fp32", "int8", True), "--quantize int8 runs on the CPU only"),
        (("cuda", "fp32", "int8", True), "--quantize int8 runs on the CPU only"),
        (("cpu", "bf16", "int8", False), "does not combine with bf16"),
        (("tpu", "fp32", None, False), "--device must be one of auto, cpu, cuda"),
        (("cpu", "int4", None, False), "--precision must be one of fp32, bf16, fp16"),
    ],
)  # fmt: skip
def test_impossible_combinations_say_why(args, message):
    with pytest.raises(PlacementError) as err:
        choose_placement(*args)
    assert message in str(err.value)


def test_int8_stays_a_cpu_option():
    assert choose_placement("auto", "fp32", "int8", cuda_available=False) == Placement("cpu", "fp32")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 0.0), ("bf16", 0.05), ("fp16", 0.01)])
def test_cpu_placement_casts_and_outputs_keep_the_signature_datatype(precision, atol):
    torch.manual_seed(0)
    net = Tiny().eval()
    inputs, outputs = infer_signature(net)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    model = TorchModel("t", LoadedNetwork(net, "1", inputs, outputs), Placement("cpu", precision))
    assert model.network.module.linear.weight.dtype == Placement("cpu", precision).dtype
    x.flags.writeable = False  # as a binary request body's view arrives
    got = model.predict({"input": x})["output"]
    assert got.dtype == np.float32  # the declared FP32, whatever the compute precision
    np.testing.assert_allclose(got, want, atol=atol)
    if precision != "fp32":
        assert not np.array_equal(got, want)  # it really ran in lower precision


def test_cpu_keeps_numpy_buffers_and_batches_use_the_allocator_given():
    assert Placement("cpu").host_allocator() is None
    a, b = {"x": np.ones((2, 3), np.float32)}, {"x": np.zeros((1, 3), np.float32)}
    assert concat([a]) is a  # a lone request on the CPU is not copied
    made = []

    def allocate(shape, dtype):
        made.append((shape, dtype))
        return np.full(shape, 7, dtype)

    batch = concat([a, b], allocate)
    assert made == [((3, 3), np.dtype(np.float32))]
    np.testing.assert_array_equal(batch["x"], np.concatenate([a["x"], b["x"]]))
    assert concat([a], allocate)["x"] is not a["x"]  # with an allocator (pinned), even one is copied in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/device_checks.sh)")
def test_gpu_batches_are_assembled_in_pinned_memory():
    buffer = Placement("cuda:0").host_allocator()((4, 8), np.dtype(np.float32))
    assert torch.from_numpy(buffer).is_pinned()
