"""Model factories a checkpoint may name: looked up by name, never imported off the volume.

A checkpoint's manifest names its model as ``{"factory": "module:function", "config": {...}}``. An
unencrypted manifest has no MAC, so whoever can write the volume chooses that string: importing it
would run their code. The registry therefore only *looks the string up* among factories the
operator of the process trusts:

- the trainer's own examples (they ship in the same package as this module);
- entry points of installed packages, group ``aidc.models``
  (``[project.entry-points."aidc.models"] my-lm = "my_pkg.models:build_lm"``), registered under
  both the entry point's name and its ``module:function`` value;
- an explicit allowlist of ``module:function`` strings (the server's ``--model-factories`` /
  ``AIDC_MODEL_FACTORIES``, comma separated).

A module is imported only when a registered factory is resolved, never to find out whether a name
is registered.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from collections.abc import Callable, Iterable
from functools import reduce
from typing import TYPE_CHECKING, Any

from aidc_trainer.errors import CheckpointCorruptError

if TYPE_CHECKING:  # no torch import just to read a setting (the server's config uses this module)
    from torch import nn

ENTRY_POINT_GROUP = "aidc.models"
ALLOWLIST_ENV = "AIDC_MODEL_FACTORIES"
# The examples the trainer ships: checkpoints written by its built-in recipes name these.
BUILTIN_FACTORIES = (
    "aidc_trainer.examples.mlp:build_model",
    "aidc_trainer.examples.transformer_lm:build_model",
)
_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

Factory = Callable[..., "nn.Module"]


class UnregisteredModelError(LookupError):
    """A manifest names a model factory this process does not trust (a configuration problem)."""

    def __init__(self, factory: str, registered: Iterable[str]) -> None:
        known = ", ".join(sorted(registered)) or "none"
        super().__init__(
            f"model factory {factory!r} is not registered; register it as an entry point in group "
            f"{ENTRY_POINT_GROUP!r} of an installed package, or allowlist it on the model server with "
            f"--model-factories / {ALLOWLIST_ENV}={factory} (registered: {known})"
        )
        self.factory = factory

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


def parse_allowlist(text: str | None) -> list[str]:
    """``"a.b:f, c:g"`` -> ``["a.b:f", "c:g"]``; raises ValueError on an entry that is not module:function."""
    refs = [part.strip() for part in (text or "").split(",") if part.strip()]
    bad = [r for r in refs if not _REF.match(r)]
    if bad:
        raise ValueError(f"model factories must be 'module:function', not {', '.join(map(repr, bad))}")
    return refs


def _import_ref(ref: str) -> Factory:
    module_name, _, attr = ref.partition(":")
    return reduce(getattr, attr.split("."), importlib.import_module(module_name))


class ModelRegistry:
    """Names -> factories; resolving imports lazily, and only what was registered."""

    def __init__(
        self, allowlist: Iterable[str] = (), *, entry_points: bool = True, builtins: bool = True
    ) -> None:
        self._loaders: dict[str, Callable[[], Factory]] = {}
        for ref in (*(BUILTIN_FACTORIES if builtins else ()), *parse_allowlist(",".join(allowlist))):
            self._loaders[ref] = lambda ref=ref: _import_ref(ref)
        if entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                # Reading entry point metadata imports nothing; ep.load() does, on resolve.
                self._loaders.setdefault(ep.name, ep.load)
                self._loaders.setdefault(f"{ep.module}:{ep.attr}", ep.load)

    def names(self) -> list[str]:
        return sorted(self._loaders)

    def __contains__(self, factory: object) -> bool:
        return isinstance(factory, str) and factory in self._loaders

    def resolve(self, factory: str) -> Factory:
        loader = self._loaders.get(factory)
        if loader is None:
            raise UnregisteredModelError(factory, self._loaders)
        return loader()

    def check(self, spec: dict[str, Any]) -> str:
        """The factory name of a manifest's ``model`` entry, if well-formed and registered (no import)."""
        factory = spec.get("factory")
        if not isinstance(factory, str) or not factory:
            raise CheckpointCorruptError(f"manifest model factory {factory!r} is not a name", "manifest")
        if factory not in self._loaders:
            raise UnregisteredModelError(factory, self._loaders)
        return factory

    def build(self, spec: dict[str, Any]) -> nn.Module:
        """Call the registered factory a manifest's ``model`` entry names with its ``config``."""
        config = spec.get("config") or {}
        if not isinstance(config, dict):
            raise CheckpointCorruptError(f"manifest model config {config!r} is not an object", "manifest")
        return self.resolve(self.check(spec))(**config)


def default_registry(environ: dict[str, str] | None = None) -> ModelRegistry:
    """Built-ins, installed entry points and the ``AIDC_MODEL_FACTORIES`` allowlist."""
    env = os.environ if environ is None else environ
    return ModelRegistry(parse_allowlist(env.get(ALLOWLIST_ENV)))
