"""Sharded checkpoints for FSDP on torch.distributed.checkpoint (DCP), encrypted, resharding on resume.

Layout (format ``aidc-checkpoint/2``, ``"layout": "dcp"``; docs/contracts.md)::

    step-000000100/
        __<r>_0.distcp    rank r's shards: its slices of model and optimiser (DTensor local shards),
                          its RNG state (``rng/<r>``), plus replicated items DCP assigned to it
        .metadata         DCP's index of every item (written by the coordinator, rank 0)
        manifest.json     written last: step, world_size, parallelism, layout, key_id,
                          files{size, sha256} for every file above, state_keys, model, time, mac

Every file goes through :class:`aidc_trainer.dcp_storage.EncryptedWriter` (AES-256-GCM chunks, no
plaintext byte at rest). A save is ``dcp.async_save``: the training thread only stages a CPU copy
of this rank's shards; planning, writing and fsync run on DCP's thread over the checkpoint gloo
group; then (our daemon thread, as for the single-writer layout) the ranks exchange their files'
sizes and hashes and rank 0 writes the manifest and publishes (``Checkpointer._conclude``).
Nothing is ever gathered to one rank, on save or on resume.

Resume verifies in parallel (rank r checks files ``i`` with ``i % world == r``), the ranks agree
(``checkpoint_resume``), then ``dcp.load`` reads into the model's and optimiser's *sharded* state
dicts: DCP reshards, so a checkpoint written by N ranks loads on M.

DDP keeps the single-writer layout of ``checkpoint.Checkpointer``: its state is replicated, so one
writer (rank 0) is the least I/O and any world size reads it unchanged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from aidc_trainer import dcp_storage
from aidc_trainer.checkpoint import Checkpointer, SaveResult
from aidc_trainer.checkpoint_format import LoadedCheckpoint, read_manifest, step_dir_name
from aidc_trainer.dcp_storage import EncryptedReader, EncryptedWriter, verify_files
from aidc_trainer.errors import CheckpointCorruptError
from aidc_trainer.keyring import KeyRing

__all__ = [
    "FORMAT",
    "LAYOUT",
    "ShardedCheckpointer",
    "is_sharded",
    "load_full",
    "restore_training_state",
    "training_state",
    "verify_share",
]

log = logging.getLogger("aidc_trainer.checkpoint")

FORMAT = "aidc-checkpoint/2"
LAYOUT = "dcp"
METADATA = ".metadata"


def is_sharded(manifest: dict[str, Any]) -> bool:
    return manifest.get("layout") == LAYOUT


# ------------------------------------------------------------------------------- RNG as tensors
# Tensors, not pickled objects: DCP stores non-tensor values with pickle and loads them with
# weights_only=False; the RNG state needs none of that.


def _rng_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    version, internal, gauss = state["python"]
    out = {
        "torch": state["torch"].clone(),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
    }
    if "cuda" in state:
        out["cuda"] = state["cuda"].clone()
    return out


def _rng_state(t: dict[str, torch.Tensor]) -> dict[str, Any]:
    ints = [int(v) for v in t["python"].tolist()]
    gauss = float(t["python_gauss"].item())
    state: dict[str, Any] = {
        "torch": t["torch"],
        "python": (ints[0], tuple(ints[1:]), None if math.isnan(gauss) else gauss),
    }
    if "cuda" in t:
        state["cuda"] = t["cuda"]
    return state


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns when it runs without a process group; here that is the intent (one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# -------------------------------------------------------------------------------------- saving


def training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, fsdp: bool
) -> dict[str, Any]:
    """Model + optimiser (+ GradScaler) as saved: FSDP's sharded state dicts (DTensors, this rank's
    slices only), or the plain replicated state dicts for DDP / one process."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)  # default options: sharded, no gather
        s: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    else:
        s = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if scaler is not None and scaler.is_enabled():
        s["scaler"] = scaler.state_dict()
    return s


def _cause(e: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (e.g. the ENOSPC)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return first[0]
    return e


@dataclass
class ShardedCheckpointer(Checkpointer):
    """A :class:`Checkpointer` whose every rank writes only its own shards, with ``dcp.async_save``."""

    parallelism: str = "fsdp"
    _stager: DefaultStager | None = field(default=None, init=False, repr=False)

    def _staging(self) -> DefaultStager:
        """One stager for every save, as plain ``dcp.async_save`` stages (DCP's own stager, not the
        storage writer's: that one allocates and page-faults a fresh copy every save, which doubled
        the stall); pinned host memory and non-blocking copies when the state is on a GPU."""
        if self._stager is None:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            self._stager = DefaultStager(StagingOptions(cuda, False, False, cuda))
        return self._stager

    def close(self) -> None:
        super().close()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def save(
        self,
        step: int,
        shared_state: dict[str, Any] | None,
        rank_state: dict[str, Any],
        extra: dict[str, Any] | None = None,
        block: bool = False,
    ) -> float:
        """Start saving ``step``; returns the seconds the caller was stalled (waiting + staging).

        ``shared_state`` is :func:`training_state` (this rank's shards); every rank calls this.
        """
        t0 = time.perf_counter()
        self.wait()
        state = {**(shared_state or {}), f"rng/{self.rank}": _rng_tensors(rank_state)}
        tmp = self.root / f".tmp-{step_dir_name(step)}-{self.run_id}"
        key_id = self.keyring.current_id if self.keyring is not None else None
        writer = EncryptedWriter(tmp, self.keyring, step)
        header = {
            "format": FORMAT,
            "layout": LAYOUT,
            "parallelism": self.parallelism,
            # top-level keys every rank wrote (rng/<r> for each rank): what a resume may ask for
            "state_keys": sorted({*state, *(f"rng/{r}" for r in range(self.world_size))}),
        }
        distributed = dist.is_available() and dist.is_initialized()
        # Blocking part: stage this rank's shards into CPU memory; the rest runs on DCP's thread,
        # over the checkpoint group so it never shares training's communicator.
        fut = dcp.async_save(
            state,
            storage_writer=writer,
            process_group=self.group,
            no_dist=not distributed,
            async_stager=self._staging(),
        )
        del state
        extra = dict(extra or {})
        self._inflight = self._start(
            step, lambda: self._finish_save(step, fut, writer, tmp, extra, key_id, header, t0)
        )
        if block:
            self.wait()
        return time.perf_counter() - t0

    def _finish_save(
        self,
        step: int,
        fut: concurrent.futures.Future[Any],
        writer: EncryptedWriter,
        tmp: Path,
        extra: dict[str, Any],
        key_id: str | None,
        header: dict[str, Any],
        t0: float,
    ) -> SaveResult:
        who = f"rank {self.rank}"
        mine: dict[str, Any]
        try:
            fut.result()
            mine = {"ok": True, "name": who, "files": writer.files()}
        except (Exception, CheckpointException) as e:  # e.g. ENOSPC: DCP fails it on every rank
            cause = _cause(e)
            mine = {"ok": False, "name": who, "error": f"{type(cause).__name__}: {cause}"}
        return self._conclude(step, tmp, mine, extra, t0, key_id, header)


# ------------------------------------------------------------------------------------- resume


def verify_share(path: Path, manifest: dict[str, Any], rank: int, world_size: int) -> None:
    """Check this rank's share of the files (sha256 + size as stored); the manifest's MAC was
    checked by ``read_manifest``. Raises :class:`CheckpointCorruptError` naming the file."""
    files = manifest.get("files")
    if not isinstance(files, dict) or METADATA not in files:
        raise CheckpointCorruptError(
            f"{path.name}/manifest.json: sharded checkpoint lists no {METADATA}", "manifest", str(path)
        )
    names = sorted(files)
    verify_files(path, files, [n for i, n in enumerate(names) if i % max(1, world_size) == rank])


def restore_training_state(
    loaded: LoadedCheckpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    keyring: KeyRing | None,
    group: Any,
    rank: int,
    world_size: int,
    fsdp: bool,
) -> dict[str, Any] | None:
    """Load ``loaded`` into model, optimiser and scaler; returns this rank's saved RNG state, or
    None when the checkpoint has none for it (another world size). Collective for a sharded one."""
    if is_sharded(loaded.manifest):
        return _load_sharded(loaded, model, optimizer, scaler, keyring, group, rank, world_size)
    st = loaded.state  # format 1: every rank holds the full state read from rank-0's file
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=st["model"],
            optim_state_dict=st["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
    if "scaler" in st and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(st["scaler"])
    if st.get("rank") and loaded.manifest.get("world_size") == world_size:
        return dict(st["rank"])
    return None


def _load_sharded(
    loaded: LoadedCheckpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    keyring: KeyRing | None,
    group: Any,
    rank: int,
    world_size: int,
) -> dict[str, Any] | None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from aidc_trainer.distributed import rng_state

    manifest = loaded.manifest
    keys = set(manifest.get("state_keys") or ())
    # Templates: this rank's shards of the current layout; DCP reads the overlapping saved slices.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    rng_key = f"rng/{rank}"
    if rng_key in keys and manifest.get("world_size") == world_size:
        state[rng_key] = _rng_tensors(rng_state())
    if scaler is not None and scaler.is_enabled() and "scaler" in keys:
        state["scaler"] = scaler.state_dict()
    reader = EncryptedReader(loaded.path, keyring, loaded.step)
    distributed = dist.is_available() and dist.is_initialized()
    with _single_process_is_intended():
        dcp_storage.load(state, reader, process_group=group, no_dist=not distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return _rng_state(state[rng_key]) if rng_key in state else None


def load_full(
    path: str | Path, keyring: KeyRing | None, keys: tuple[str, ...] = ("model",)
) -> LoadedCheckpoint:
    """Verify a sharded checkpoint and load the tensors under ``keys`` as full (unsharded) tensors
    in this process (the model server, tools, tests). Decrypts in memory only; no process group.

    ``state["model"]`` is a plain state dict for the model ``manifest["model"]`` describes.
    """
    path = Path(path)
    manifest = read_manifest(path, keyring)
    verify_share(path, manifest, 0, 1)
    step = int(manifest["step"])
    reader = EncryptedReader(path, keyring, step)
    try:
        metadata = reader.read_metadata()
    except Exception as e:
        raise dcp_storage.storage_error(e, reader) or e from None
    state: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        top, _, rest = fqn.partition(".")
        if top in keys and rest and isinstance(meta, TensorStorageMetadata):
            state.setdefault(top, {})[rest] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with _single_process_is_intended():
        dcp_storage.load(state, reader, no_dist=True)
    return LoadedCheckpoint(step=step, path=path, manifest=manifest, state=state)
