"""One rank of a gloo job that saves a model sharded over the ranks, as the FSDP trainer does.

Each rank holds its dim-0 shard of every parameter (a DTensor), DCP writes each rank's shards to its
own encrypted file, and rank 0 writes the manifest last (docs/contracts.md, layout "dcp").

    python dcp_sharded_writer.py RANK WORLD PORT ROOT STEP SEED KEY_DIR|- SPEC_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from aidc_trainer import checkpoint_publish as publish
from aidc_trainer import checkpoint_sharded as sharded
from aidc_trainer.checkpoint_format import step_dir_name
from aidc_trainer.dcp_storage import EncryptedWriter
from aidc_trainer.keyring import KeyRing
from aidc_trainer.model_registry import default_registry


def write_manifest(
    step_dir: Path, step: int, world: int, files: dict[str, Any], spec: dict[str, Any], ring: KeyRing | None
) -> None:
    """The manifest of the DCP layout, written by the trainer's own writer."""
    key_id = ring.current_id if ring is not None else None
    header = {"format": sharded.FORMAT, "layout": sharded.LAYOUT, "parallelism": "fsdp"}
    publish.write_manifest(step_dir, step, world, files, key_id, ring, spec, {}, header)


def main(rank: int, world: int, port: int, root: Path, step: int, seed: int, keys: str, spec: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(seed)
    model = default_registry().build(spec)
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in model.state_dict().items()}
    ring = KeyRing.from_dir(keys) if keys != "-" else None
    step_dir = root / step_dir_name(step)
    writer = EncryptedWriter(step_dir, ring, step)
    dcp.save({"model": sharded}, storage_writer=writer)
    everyone: list[dict[str, Any] | None] = [None] * world
    dist.all_gather_object(everyone, writer.files())
    if rank == 0:
        files = {name: entry for mine in everyone for name, entry in (mine or {}).items()}
        write_manifest(step_dir, step, world, files, spec, ring)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), Path(a[3]), int(a[4]), int(a[5]), a[6], json.loads(a[7]))
