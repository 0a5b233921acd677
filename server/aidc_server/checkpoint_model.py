"""A TorchModel whose weights come from the newest verified aidc checkpoint.

The trainer's checkpoint module owns the format: it verifies sha256s and decrypts in memory, so
plaintext weights never touch the disk here either. Version = checkpoint step.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from torch import nn

from aidc_server.model import LoadedNetwork, TorchModel, check_runs, infer_signature
from aidc_server.quantize import quantize_int8

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
    ) -> None:
        super().__init__(name)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.key_dir = key_dir
        self.kek_file = kek_file
        self.quantize = quantize
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
        from aidc_trainer.errors import CheckpointCorruptError, MissingKeyError
        from aidc_trainer.keyring import KeyRing

        where = str(self.checkpoint_dir)
        if not self.checkpoint_dir.is_dir():
            return None, f"checkpoint directory {where} does not exist (yet)"
        # Same walk as ckpt.load_latest (newest first, skip what fails verification), done here so
        # the reasons for skipping reach /ready instead of only the trainer's log.
        skipped: list[str] = []
        loaded = None
        try:
            keyring = KeyRing.from_dir(self.key_dir, kek_file=self.kek_file) if self.key_dir else None
            for path in reversed(ckpt.list_checkpoints(self.checkpoint_dir)):
                try:
                    loaded = ckpt.load_checkpoint(path, keyring, rank=0)
                    break
                except CheckpointCorruptError as e:
                    log.warning("model %s: skipping %s: %s", self.name, path.name, e)
                    skipped.append(f"{path.name} refused ({e.reason}): {e}")
        except MissingKeyError as e:
            return None, f"cannot decrypt checkpoint: {e}"
        except Exception as e:  # unreadable files, unpickling errors…: not ready, never a crash
            log.exception("model %s: cannot read checkpoints in %s", self.name, where)
            return None, f"cannot read checkpoint: {type(e).__name__}: {e}"
        if loaded is None:
            if not skipped:
                return None, f"no checkpoint in {where} yet"
            return None, "no checkpoint passed verification; " + "; ".join(skipped[:3])
        try:
            network = self._build(loaded)
        except Exception as e:  # a manifest that names a bad factory must not crash the server
            log.exception("model %s: cannot build the network of step %s", self.name, loaded.step)
            return None, f"cannot build model from checkpoint step {loaded.step}: {type(e).__name__}: {e}"
        return network, ""

    def _build(self, loaded) -> LoadedNetwork:
        from aidc_trainer import checkpoint as ckpt

        module: nn.Module = ckpt.build_model_from_manifest(loaded.manifest)
        module.load_state_dict(loaded.state["model"], strict=True)
        module.eval()
        config = (loaded.manifest.get("model") or {}).get("config") or {}
        max_seq_len = next((config[k] for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), None)
        inputs, outputs = infer_signature(module, max_seq_len)  # before quantizing: plain layers
        if self.quantize == "int8":
            module = quantize_int8(module)
            check_runs(module, inputs)  # refuse a quantized network that cannot run, at load time
        return LoadedNetwork(module=module, version=str(loaded.step), inputs=inputs, outputs=outputs)
