"""int8 quantization and signature inference on the trainer's example networks."""

import copy

import numpy as np
import pytest
import torch

from aidc_server.model import infer_signature
from aidc_server.quantize import quantizable_linears, quantize_int8, weight_only_int8
from aidc_server.tensors import TensorSpec
from aidc_trainer.examples import mlp, transformer_lm


@pytest.fixture
def restore_mha_fastpath():
    enabled = torch.backends.mha.get_fastpath_enabled()
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


def networks():
    torch.manual_seed(0)
    return [
        (mlp.build_model().eval(), torch.randn(4, 10)),
        (transformer_lm.build_model(d_model=32, n_heads=2, n_layers=1, seq_len=16).eval(),
         torch.randint(0, 30, (3, 9))),
    ]  # fmt: skip


@pytest.mark.parametrize("quantize", [quantize_int8, weight_only_int8])
def test_int8_networks_run_and_stay_close(quantize, restore_mha_fastpath):
    for net, x in networks():
        with torch.inference_mode():
            want = net(x)
            got = quantize(copy.deepcopy(net))(x)
        assert got.shape == want.shape
        assert not torch.equal(got, want)
        assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_attention_projections_stay_float():
    net = transformer_lm.build_model(d_model=32, n_heads=2, n_layers=1, seq_len=16)
    names = quantizable_linears(net)
    assert names == {"blocks.layers.0.linear1", "blocks.layers.0.linear2", "head"}


def test_signature_of_the_examples():
    net, _ = networks()[0]
    assert infer_signature(net) == (
        [TensorSpec("input", "FP32", (-1, 10))],
        [TensorSpec("output", "FP32", (-1, 10))],
    )
    lm, _ = networks()[1]
    inputs, outputs = infer_signature(lm, max_seq_len=16)
    assert inputs == [TensorSpec("input", "INT64", (-1, -1), (0, 29), (-1, 16))]
    assert outputs == [TensorSpec("output", "FP32", (-1, -1, 30))]
    inputs[0].check(np.zeros((2, 16), np.int64))
