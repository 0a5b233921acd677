"""Checkpoint stall: aidc async encrypted save vs synchronous torch.save, plus crypto throughput.

State = a model of ``--params-m`` million fp32 parameters plus its Adam state (3x the parameters),
on ``--device`` (cpu, or cuda when available). For each of ``--reps`` saves:

- sync: ``torch.save(state, file)`` + fsync; the training thread is blocked for all of it.
- aidc: ``Checkpointer.save`` (copy to CPU, then serialise + AES-256-GCM + sha256 + fsync + manifest
  + atomic rename on a background thread). The stall is what ``save`` blocks the caller for; the
  background time is reported separately. Saves are spaced out (``wait``) as in training, where
  the next checkpoint is many steps later.

Then single-core throughput of the crypto path: AES-256-GCM encrypt and decrypt (chunked, 1 MiB),
and sha256, on an in-memory buffer.

    .venv/bin/python bench/checkpoint.py --params-m 25 --reps 5
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "trainer"))

from aidc_trainer.checkpoint import Checkpointer
from aidc_trainer.crypto import DecryptingReader, EncryptingWriter
from aidc_trainer.keyring import KeyRing


class _Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        return len(b)


def build_state(params_m: float, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width, device=device)).sum().backward()
    opt.step()  # materialise Adam's exp_avg / exp_avg_sq
    return model, opt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_stall(params_m: float, reps: int, device: torch.device, root: Path) -> dict[str, float]:
    model, opt = build_state(params_m, device)
    n_params = sum(p.numel() for p in model.parameters())
    ring = KeyRing({"b1": os.urandom(32)}, "b1")
    sync_times, stalls, bg = [], [], []
    for i in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        path = root / f"sync-{i}.pt"
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        sync_times.append(time.perf_counter() - t0)
        nbytes = path.stat().st_size
        path.unlink()
    ck = Checkpointer(root / "aidc", keyring=ring, keep=2)
    for i in range(reps):
        _sync(device)
        stalls.append(ck.save(i + 1, {"model": model.state_dict(), "optimizer": opt.state_dict()}, {}))
        res = ck.wait()
        assert res is not None and res.ok, res
        bg.append(res.seconds)
    ck.close()
    return {
        "params": n_params,
        "bytes": nbytes,
        "sync_s": statistics.median(sync_times),
        "stall_s": statistics.median(stalls),
        "stall_first_s": stalls[0],
        "background_s": statistics.median(bg),
    }


def bench_crypto(mb: int) -> dict[str, float]:
    data = os.urandom(mb << 20)
    key = os.urandom(32)
    ring = KeyRing({"b1": key}, "b1")
    t0 = time.perf_counter()
    w = EncryptingWriter(_Null(), key, "b1", "bench")  # type: ignore[arg-type]
    w.write(data)
    w.close()
    enc = time.perf_counter() - t0
    out = io.BytesIO()
    with EncryptingWriter(out, key, "b1", "bench") as w2:
        w2.write(data)
    blob = out.getvalue()
    t0 = time.perf_counter()
    n = sum(len(c) for c in DecryptingReader(io.BytesIO(blob), ring, "bench").chunks())
    dec = time.perf_counter() - t0
    assert n == len(data)
    import hashlib

    t0 = time.perf_counter()
    hashlib.sha256(blob).digest()
    sha = time.perf_counter() - t0
    gb = len(data) / 1e9
    return {"encrypt_gbps": gb / enc, "decrypt_gbps": gb / dec, "sha256_gbps": gb / sha}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params-m", type=float, default=25.0, help="model size in millions of parameters")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--crypto-mb", type=int, default=512)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    a = p.parse_args()
    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else a.device.replace("auto", "cpu")
    )
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        r = bench_stall(a.params_m, a.reps, device, Path(tmp))
    c = bench_crypto(a.crypto_mb)
    print(
        f"state: {r['params'] / 1e6:.1f}M params + Adam on {device} = {r['bytes'] / 1e6:.0f} MB; "
        f"median of {a.reps} saves"
    )
    print(f"sync torch.save + fsync (training blocked)  {1000 * r['sync_s']:9.1f} ms")
    print(
        f"aidc async encrypted: stall                {1000 * r['stall_s']:9.1f} ms  "
        f"({100 * r['stall_s'] / r['sync_s']:.1f}% of sync; first save {1000 * r['stall_first_s']:.1f} ms)"
    )
    print(f"aidc async encrypted: background write     {1000 * r['background_s']:9.1f} ms")
    print(
        f"single core, 1 MiB chunks: AES-256-GCM encrypt {c['encrypt_gbps']:.2f} GB/s, "
        f"decrypt {c['decrypt_gbps']:.2f} GB/s; sha256 {c['sha256_gbps']:.2f} GB/s"
    )


if __name__ == "__main__":
    main()
