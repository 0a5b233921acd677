"""A TorchModel whose weights come from the newest verified aidc checkpoint.

The trainer's checkpoint modules own the format (one file per rank, or DCP shards): they verify
sha256s and decrypt in memory, so plaintext weights never touch the disk here either. The network
is built only by a registered factory (aidc_trainer.model_registry). Version = checkpoint step.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from aidc_server.model import LoadedNetwork, TorchModel, check_runs, infer_signature, place_network
from aidc_server.quantize import quantize_int8

if TYPE_CHECKING:
    from aidc_trainer.checkpoint_sharded_load import ServableModel
    from aidc_trainer.model_registry import ModelRegistry

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Manifest config keys that bound a token input's length (positional table size).
_CONTEXT_KEYS = ("seq_len", "max_seq_len", "block_size", "context_length")


def newest_step_on_disk(root: Path) -> int | None:
    """Cheap peek (no reads, no crypto): the highest step-N directory with a manifest."""
    try:
        steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    except OSError:
        return None
    steps = [s for s in steps if (root / f"step-{s:09d}" / "manifest.json").exists()]
    return max(steps, default=None)


class CheckpointModel(TorchModel):
    def __init__(
        self,
        name: str,
        checkpoint_dir: str | Path,
        key_dir: str | Path | None = None,
        kek_file: str | Path | None = None,
        quantize: str | None = None,
        registry: ModelRegistry | None = None,
    ) -> None:
        super().__init__(name)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.key_dir = key_dir
        self.kek_file = kek_file
        self.quantize = quantize
        self.registry = registry  # None: aidc_trainer.model_registry.default_registry()
        self._refused: set[int] = set()  # newer steps that failed to load; not retried every poll

    @property
    def refused_steps(self) -> frozenset[int]:
        """Newer steps a hot swap refused (failed verification); the one served stays."""
        return frozenset(self._refused)

    def load(self) -> bool:
        network, reason = self._load_newest()
        if network is not None:
            self._set_network(network)
            log.info("model %s: serving step %s of %s", self.name, network.version, self.checkpoint_dir)
        elif not self.ready:
            self.status.reason = reason
        return self.ready

    def refresh(self) -> bool:
        newest = newest_step_on_disk(self.checkpoint_dir)
        current = int(self.version) if self.version is not None else -1
        if newest is None or newest <= current or newest in self._refused:
            return False
        network, reason = self._load_newest()
        if network is None or int(network.version) <= current:
            # Keep serving what we have; say once why the newer one was not taken.
            self._refused.add(newest)
            log.warning(
                "model %s: not swapping to step %d, keeping step %s: %s",
                self.name,
                newest,
                self.version,
                reason or "newest checkpoint did not verify",
            )
            return False
        self._set_network(network)
        log.info("model %s: hot-swapped to checkpoint step %s", self.name, network.version)
        return True

    def _load_newest(self) -> tuple[LoadedNetwork | None, str]:
        # Imported here so the HTTP layer (and its tests) do not need the trainer package.
        from aidc_trainer import checkpoint as ckpt
        from aidc_trainer.checkpoint_sharded_load import load_servable
        from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError
        from aidc_trainer.keyring import KeyRing
        from aidc_trainer.model_registry import UnregisteredModelError, default_registry

        where = str(self.checkpoint_dir)
        if not self.checkpoint_dir.is_dir():
            return None, f"checkpoint directory {where} does not exist (yet)"
        # Same walk as ckpt.load_latest (newest first, skip what fails verification), done here so
        # the reasons for skipping reach /ready instead of only the trainer's log.
        skipped: list[str] = []
        loaded = None
        try:
            registry = self.registry or default_registry()
            keyring = KeyRing.from_dir(self.key_dir, kek_file=self.kek_file) if self.key_dir else None
            for path in reversed(ckpt.list_checkpoints(self.checkpoint_dir)):
                try:
                    loaded = load_servable(path, keyring, registry)
                    break
                except CheckpointCorruptError as e:
                    log.warning("model %s: skipping %s: %s", self.name, path.name, e)
                    skipped.append(f"{path.name} refused ({e.reason}): {e}")
        except MissingKeyError as e:
            return None, f"cannot decrypt checkpoint: {e}"
        except UnregisteredModelError as e:
            # Not an older checkpoint's problem: the server is not configured for this model.
            log.error("model %s: %s", self.name, e)
            return None, str(e)
        except Exception as e:  # unreadable files, a factory that fails…: not ready, never a crash
            log.exception("model %s: cannot load checkpoints in %s", self.name, where)
            return None, f"cannot load checkpoint: {type(e).__name__}: {e}"
        if loaded is None:
            if not skipped:
                return None, f"no checkpoint in {where} yet"
            return None, "no checkpoint passed verification; " + "; ".join(skipped[:3])
        try:
            network = self._build(loaded)
        except Exception as e:  # a network that cannot be probed or quantized must not crash the server
            log.exception("model %s: cannot build the network of step %s", self.name, loaded.step)
            return None, f"cannot build model from checkpoint step {loaded.step}: {type(e).__name__}: {e}"
        return network, ""

    def _build(self, loaded: ServableModel) -> LoadedNetwork:
        module: nn.Module = loaded.module
        module.eval()
        config = (loaded.manifest.get("model") or {}).get("config") or {}
        max_seq_len = next((config[k] for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), None)
        inputs, outputs = infer_signature(module, max_seq_len)  # before quantizing: plain layers
        if self.quantize == "int8":
            module = quantize_int8(module)
            check_runs(module, inputs)  # refuse a quantized network that cannot run, at load time
        network = LoadedNetwork(module=module, version=str(loaded.step), inputs=inputs, outputs=outputs)
        return place_network(network, self.placement)  # on the GPU / in bf16 as --device/--precision say
