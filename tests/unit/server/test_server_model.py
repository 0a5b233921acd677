"""Model.validate: how request tensors are matched to a model's signature."""

from __future__ import annotations

import numpy as np
import pytest

from aidc_server.errors import InvalidInput
from aidc_server.model import Model
from aidc_server.tensors import TensorSpec


class Signature(Model):
    def __init__(self, *inputs: TensorSpec) -> None:
        super().__init__("m")
        self._inputs = list(inputs)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs


ONE = Signature(TensorSpec("input", "FP32", (-1, 3)))
TWO = Signature(TensorSpec("ids", "INT64", (-1, 4)), TensorSpec("mask", "BOOL", (-1, 4)))


@pytest.mark.parametrize("name", ["input", "input-0", "input__0", "x"])
def test_a_single_input_model_takes_its_input_under_any_name(name):
    x = np.zeros((2, 3), np.float32)
    out = ONE.validate({name: x})
    assert list(out) == ["input"] and out["input"] is x


def test_errors_name_the_input_as_the_client_sent_it():
    with pytest.raises(InvalidInput, match="input 'input-0': wrong shape"):
        ONE.validate({"input-0": np.zeros((2, 4), np.float32)})


def test_a_model_with_several_inputs_still_matches_by_name():
    ids, mask = np.zeros((1, 4), np.int64), np.ones((1, 4), np.bool_)
    assert TWO.validate({"mask": mask, "ids": ids}) == {"mask": mask, "ids": ids}
    with pytest.raises(InvalidInput, match="unknown input 'input-0'"):
        TWO.validate({"input-0": ids, "mask": mask})
    with pytest.raises(InvalidInput, match="missing input 'mask'"):
        TWO.validate({"ids": ids})
    with pytest.raises(InvalidInput, match="unknown input 'input-0'"):  # two tensors for one input
        ONE.validate({"input-0": np.zeros((1, 3), np.float32), "input-1": np.zeros((1, 3), np.float32)})


@pytest.mark.parametrize(
    ("model", "inputs", "named"),
    [
        (ONE, {"input": np.zeros((0, 3), np.float32)}, "input"),
        (ONE, {"input-0": np.zeros((0, 3), np.float32)}, "input-0"),
        (TWO, {"ids": np.zeros((0, 4), np.int64), "mask": np.zeros((0, 4), np.bool_)}, "ids"),
    ],
)
def test_an_empty_batch_is_refused_naming_the_input(model, inputs, named):
    with pytest.raises(InvalidInput, match=rf"input '{named}': empty batch \(shape \[0, \d\]\)"):
        model.validate(inputs)
