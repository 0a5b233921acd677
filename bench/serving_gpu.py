"""GPU check of the model server's inference path (issue 16): the example transformer, loaded from an
aidc checkpoint by the server's own CheckpointModel, on the GPU in fp32 and bf16, fed through the
server's DynamicBatcher (pinned batch buffers, one copy per batch), against the same checkpoint on
the CPU. Prints the largest difference and rows/s per placement; exits 1 when outputs disagree.

Run by bench/device_checks.sh with the machine's python3 (torch with CUDA, numpy, orjson,
cryptography). Without a GPU it runs the CPU side only and says so.

    PYTHONPATH=server:trainer python3 bench/serving_gpu.py --requests 512 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time

import numpy as np
import torch

from aidc_server.batching import DynamicBatcher
from aidc_server.checkpoint_model import CheckpointModel
from aidc_server.device import Placement
from aidc_trainer.checkpoint import build_model_from_manifest, save_checkpoint
from aidc_trainer.examples import transformer_lm

SEQ = 32
SPEC = {
    "factory": transformer_lm.FACTORY,
    "config": {"vocab_size": 30, "d_model": 256, "n_heads": 8, "n_layers": 4, "seq_len": SEQ},
}


def load(root: str, placement: Placement) -> CheckpointModel:
    model = CheckpointModel("lm", root)
    model.placement = placement
    if not model.load():
        raise SystemExit(f"cannot load on {placement}: {model.status.reason}")
    return model


async def serve(model: CheckpointModel, tokens: np.ndarray, concurrency: int) -> tuple[np.ndarray, float]:
    """Every row as its own request, `concurrency` in flight: batches form as they do in the server."""
    batcher = DynamicBatcher(model.predict_versioned, max_batch_size=64, allocate=model.host_allocator())
    batcher.start()
    out: list[np.ndarray | None] = [None] * len(tokens)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            out[i] = (await batcher.submit({"input": tokens[i : i + 1]}))[1]["output"]

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(tokens))))
    seconds = time.perf_counter() - started
    await batcher.close()
    return np.concatenate(out), len(tokens) / seconds  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 30, size=(args.requests, SEQ)).astype(np.int64)
    ok = True
    with tempfile.TemporaryDirectory() as root:
        net = build_model_from_manifest({"model": SPEC}).eval()
        assert save_checkpoint(root, 1, {"model": net.state_dict()}, model_spec=SPEC).ok
        cpu, cpu_rate = asyncio.run(serve(load(root, Placement("cpu")), tokens, args.concurrency))
        print(f"cpu fp32: {cpu_rate:,.0f} rows/s ([1, {SEQ}] requests, concurrency {args.concurrency})")
        if not torch.cuda.is_available():
            print("no CUDA device: GPU placements not checked")
            return 0
        print("gpu:", torch.cuda.get_device_name(0))
        scale = float(np.abs(cpu).max())
        for precision, rtol in (("fp32", 1e-3), ("bf16", 5e-2)):
            gpu, rate = asyncio.run(
                serve(load(root, Placement("cuda:0", precision)), tokens, args.concurrency)
            )
            diff = float(np.abs(gpu - cpu).max())
            agree = float((gpu.argmax(-1) == cpu.argmax(-1)).mean())
            good = gpu.dtype == np.float32 and diff <= rtol * scale and agree >= 0.99
            ok &= good
            print(
                f"cuda {precision}: {rate:,.0f} rows/s ({rate / cpu_rate:.1f}x cpu); "
                f"max |gpu-cpu| {diff:.2e} (allowed {rtol * scale:.2e}), "
                f"argmax agreement {agree:.4f}: {'OK' if good else 'MISMATCH'}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
