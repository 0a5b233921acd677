"""Models the server can host, KServe-style: load() then predict(); no HTTP in here.

`Model` is the interface the protocol layer sees. `TorchModel` serves any nn.Module with a declared
signature; `aidc_server.checkpoint_model.CheckpointModel` builds one from an aidc checkpoint. Where
the network runs (CPU or GPU, fp32/bf16/fp16) is its `Placement` (aidc_server.device).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from aidc_server.device import Allocator, Placement
from aidc_server.errors import InvalidInput
from aidc_server.tensors import DATATYPE_OF, DTYPES, TensorSpec

log = logging.getLogger(__name__)


@dataclass
class ModelStatus:
    """What /ready and metadata report: loaded or not, and why not."""

    ready: bool = False
    version: str | None = None
    reason: str = "model not loaded yet"
    versions_seen: list[str] = field(default_factory=list)


class Model:
    """Interface: a named model with a signature, a version and a batched predict()."""

    name: str
    platform = "pytorch"

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = ModelStatus()

    @property
    def ready(self) -> bool:
        return self.status.ready

    @property
    def version(self) -> str | None:
        return self.status.version

    @property
    def inputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    @property
    def outputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def load(self) -> bool:
        """Load (or reload) weights; return readiness. Must never raise for a bad artifact."""
        raise NotImplementedError

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (first dimension = batch). Called from the single inference thread."""
        raise NotImplementedError

    def predict_versioned(self, inputs: dict[str, np.ndarray]) -> tuple[str | None, dict[str, np.ndarray]]:
        """predict() plus the version that actually ran (a hot swap may land between batches)."""
        return self.version, self.predict(inputs)

    def host_allocator(self) -> Allocator | None:
        """How the batcher allocates batch buffers (pinned memory for a GPU model); None: numpy's."""
        return None

    def refresh(self) -> bool:
        """Look for a newer artifact and swap it in; return True if the version changed."""
        return False

    def check_outputs(self, wanted: list[str] | None) -> None:
        """InvalidInput when a request asks for an output the model does not have: said before a
        forward pass is spent on it."""
        known = sorted(spec.name for spec in self.outputs)
        unknown = [o for o in wanted or () if o not in known]
        if unknown:
            raise InvalidInput(f"outputs: unknown output '{unknown[0]}'; model has {known}")

    def validate(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs keyed by the signature's names, or InvalidInput naming what does not fit.

        A model with one input takes it under any name, as KServe does: v2 clients commonly send
        `input-0` or `input__0` without reading the metadata, and with one tensor there is nothing
        to confuse. With several inputs the names are the only way to tell them apart.
        """
        specs = {s.name: s for s in self.inputs}
        if len(specs) == 1 and len(inputs) == 1:
            [(sent, array)], [name] = list(inputs.items()), list(specs)
            inputs = {name: array}
            if sent != name:
                # Say which tensor it was under the name the client used, not ours.
                specs = {name: dataclasses.replace(specs[name], name=sent)}
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise InvalidInput(f"unknown input {unknown[0]!r}; model {self.name} takes {sorted(specs)}")
        missing = sorted(set(specs) - set(inputs))
        if missing:
            raise InvalidInput(f"missing input {missing[0]!r}; model {self.name} takes {sorted(specs)}")
        for name, array in inputs.items():
            specs[name].check(array)
        batch = {a.shape[0] for a in inputs.values() if a.ndim}
        if len(batch) > 1:
            raise InvalidInput(f"inputs disagree on the batch (first) dimension: {sorted(batch)}")
        if batch == {0}:
            # Triton refuses a batch of 0 as INVALID_ARG ("batch-size must be >= 1"); we do the
            # same rather than run the network on nothing: not every network accepts an empty
            # batch (attention, norms), and an empty answer would hide a client bug.
            key = next(n for n, a in inputs.items() if a.ndim)
            raise InvalidInput(
                f"input {specs[key].name!r}: empty batch (shape {list(inputs[key].shape)});"
                " send at least one row"
            )
        return inputs

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version] if self.version else [],
            "platform": self.platform,
            "inputs": [s.metadata() for s in self.inputs],
            "outputs": [s.metadata() for s in self.outputs],
        }


@dataclass
class LoadedNetwork:
    """A ready-to-run network and its signature; swapped as one object on hot reload."""

    module: nn.Module
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    placement: Placement = field(default_factory=Placement)


def place_network(network: LoadedNetwork, placement: Placement) -> LoadedNetwork:
    """The network on its device in its precision, after one dummy batch ran there (so a network
    that cannot run in that precision is refused at load time, and the first request pays no warm-up)."""
    if placement == network.placement:
        return network
    module = placement.place_module(network.module)
    placed = dataclasses.replace(network, module=module, placement=placement)
    _probe(module, network.inputs, 2, placement)
    return placed


class TorchModel(Model):
    """Serves an nn.Module taking one tensor and returning one tensor (or a dict of them)."""

    def __init__(
        self, name: str, network: LoadedNetwork | None = None, placement: Placement | None = None
    ) -> None:
        super().__init__(name)
        self.placement = placement or Placement()  # where load() puts each network it builds
        self.network = network
        if network is not None:
            self._set_network(place_network(network, self.placement))

    def host_allocator(self) -> Allocator | None:
        return self.placement.host_allocator()

    def _set_network(self, network: LoadedNetwork) -> None:
        # One reference assignment: a batch already running keeps the network it started with.
        self.network = network
        self.status.ready = True
        self.status.version = network.version
        self.status.reason = ""
        if network.version not in self.status.versions_seen:
            self.status.versions_seen.append(network.version)

    def load(self) -> bool:
        return self.network is not None

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.network.inputs if self.network else []

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.network.outputs if self.network else []

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.predict_versioned(inputs)[1]

    def predict_versioned(self, inputs: dict[str, np.ndarray]) -> tuple[str | None, dict[str, np.ndarray]]:
        network = self.network  # read once: the whole batch runs on one version
        if network is None:
            raise RuntimeError("predict() before load()")
        return network.version, run_network(network, inputs)


def run_network(network: LoadedNetwork, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    place = network.placement
    tensors = [place.to_device(inputs[s.name]) for s in network.inputs]
    with torch.inference_mode():
        result = network.module(*tensors)
    if isinstance(result, torch.Tensor):
        result = (result,)
    if isinstance(result, dict):
        result = tuple(result[s.name] for s in network.outputs)
    return {
        s.name: place.to_host(t, DTYPES.get(s.datatype)) for s, t in zip(network.outputs, result, strict=True)
    }


def infer_signature(
    module: nn.Module, max_seq_len: int | None = None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Guess a one-input signature from the first layer, then probe the output with a dummy batch.

    nn.Embedding first -> INT64 token ids [-1, -1] (at most `max_seq_len` long, ids within the
    vocabulary); nn.Linear first -> FP32 [-1, in_features].
    A module may instead declare `input_spec = [("name", "FP32", [-1, 784])]` itself.
    """
    declared = getattr(module, "input_spec", None)
    if declared:
        inputs = [TensorSpec(n, d, tuple(s)) for n, d, s in declared]
    else:
        first = next((m for m in module.modules() if isinstance(m, nn.Linear | nn.Embedding)), None)
        if isinstance(first, nn.Embedding):
            limit = (-1, max_seq_len) if max_seq_len else None
            inputs = [TensorSpec("input", "INT64", (-1, -1), (0, first.num_embeddings - 1), limit)]
        elif isinstance(first, nn.Linear):
            inputs = [TensorSpec("input", "FP32", (-1, first.in_features))]
        else:
            raise ValueError(f"cannot infer the input signature of {type(module).__name__}")
    # Probe twice with different free dimensions: output dims that change with them are -1.
    probes = [_probe(module, inputs, size) for size in (2, 3)]
    outputs = []
    for i, (a, b) in enumerate(zip(*probes, strict=True)):
        shape = tuple(
            -1 if j == 0 or x != y else x for j, (x, y) in enumerate(zip(a.shape, b.shape, strict=True))
        )
        dtype = DATATYPE_OF.get(np.dtype(str(a.dtype).removeprefix("torch.")), "FP32")
        outputs.append(TensorSpec("output" if len(probes[0]) == 1 else f"output_{i}", dtype, shape))
    return inputs, outputs


def check_runs(module: nn.Module, inputs: list[TensorSpec]) -> None:
    """One dummy forward pass; raises whatever the network raises."""
    _probe(module, inputs, 2)


def _probe(
    module: nn.Module, inputs: list[TensorSpec], size: int, placement: Placement | None = None
) -> tuple[torch.Tensor, ...]:
    place = placement or Placement()
    args = []
    for spec in inputs:
        shape = [size if d == -1 else d for d in spec.shape]
        args.append(place.to_device(np.zeros(shape, dtype=DTYPES[spec.datatype])))
    with torch.inference_mode():
        out = module(*args)
    if isinstance(out, dict):
        out = tuple(out.values())
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)
