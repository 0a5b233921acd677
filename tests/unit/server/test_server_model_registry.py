"""The model server builds networks only from registered factories, never from a path on the volume."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import torch

from aidc_server.config import parse_args
from aidc_trainer.checkpoint import build_model_from_manifest, save_checkpoint
from aidc_trainer.checkpoint_sharded_load import load_servable
from aidc_trainer.examples import mlp, transformer_lm
from aidc_trainer.model_registry import ModelRegistry, UnregisteredModelError, parse_allowlist

MLP_CONFIG = {"in_features": 10, "hidden": 100, "num_classes": 10}


def recorder_module(where: Path) -> tuple[str, Path]:
    """A module on sys.path that leaves a marker file when imported; returns (module name, marker)."""
    name = f"aidc_test_recorder_{uuid.uuid4().hex[:8]}"
    marker = where / f"{name}.imported"
    (where / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "import torch\n\n"
        "def build(width=4):\n"
        "    return torch.nn.Linear(width, width)\n"
    )
    return name, marker


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "site"
    where.mkdir()
    monkeypatch.syspath_prepend(str(where))
    return where


def test_old_manifests_naming_the_examples_still_build() -> None:
    for factory, config in ((mlp.FACTORY, MLP_CONFIG), (transformer_lm.FACTORY, {"vocab_size": 30})):
        net = build_model_from_manifest({"model": {"factory": factory, "config": config}})
        assert isinstance(net, torch.nn.Module) and sum(p.numel() for p in net.parameters()) > 0


def test_entry_point_of_an_installed_package_is_registered(on_path: Path) -> None:
    module, marker = recorder_module(on_path)
    dist = on_path / "toy_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[aidc.models]\ntoy-linear = {module}:build\n")

    registry = ModelRegistry()
    assert "toy-linear" in registry and f"{module}:build" in registry
    assert not marker.exists()  # registering reads metadata only
    net = registry.build({"factory": f"{module}:build", "config": {"width": 3}})
    assert isinstance(net, torch.nn.Linear) and net.in_features == 3
    assert registry.build({"factory": "toy-linear"}).in_features == 4


def test_allowlisted_factory_is_built(on_path: Path) -> None:
    module, marker = recorder_module(on_path)
    registry = ModelRegistry([f"{module}:build"])
    net = build_model_from_manifest(
        {"model": {"factory": f"{module}:build", "config": {"width": 5}}}, registry
    )
    assert net.out_features == 5 and marker.exists()


def test_unknown_factory_is_refused_with_how_to_register_and_never_imported(on_path: Path) -> None:
    module, marker = recorder_module(on_path)
    with pytest.raises(UnregisteredModelError) as err:
        build_model_from_manifest({"model": {"factory": f"{module}:build"}}, ModelRegistry())
    text = str(err.value)
    assert f"model factory '{module}:build' is not registered" in text
    assert "aidc.models" in text and "AIDC_MODEL_FACTORIES" in text and mlp.FACTORY in text
    assert not marker.exists() and module not in sys.modules
    with pytest.raises(UnregisteredModelError, match="os:system"):
        build_model_from_manifest({"model": {"factory": "os:system", "config": {"command": "true"}}})


def test_unencrypted_checkpoint_naming_an_unlisted_module_is_never_imported(
    tmp_path: Path, on_path: Path
) -> None:
    module, marker = recorder_module(on_path)
    spec = {"factory": f"{module}:build", "config": {"width": 4}}
    # Whoever can write an unencrypted volume writes a valid checkpoint naming their module.
    result = save_checkpoint(
        tmp_path / "ck", 3, {"model": torch.nn.Linear(4, 4).state_dict()}, model_spec=spec
    )
    assert result.ok, result.error
    step = tmp_path / "ck" / "step-000000003"
    with pytest.raises(UnregisteredModelError, match="is not registered"):
        load_servable(step, None, ModelRegistry())
    assert not marker.exists() and module not in sys.modules
    # The same checkpoint loads once the server's operator allowlists the factory.
    loaded = load_servable(step, None, ModelRegistry([f"{module}:build"]))
    assert loaded.step == 3 and marker.exists()


def test_allowlist_setting_is_validated() -> None:
    assert parse_allowlist(" a.b:build, c:f.g ,") == ["a.b:build", "c:f.g"]
    with pytest.raises(ValueError, match=r"'a\.b'"):
        parse_allowlist("a.b")
    base = ["--checkpoint-dir", "/ck", "--model-name", "m"]
    s = parse_args(base, environ={"AIDC_MODEL_FACTORIES": "my_models:build_lm"})
    assert s.model_factories == "my_models:build_lm"
    with pytest.raises(SystemExit):
        parse_args([*base, "--model-factories", "import os; os.system('x')"], environ={})
