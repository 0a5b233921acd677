"""FSDP checkpoints as DCP shards: each rank writes its share, encrypted; resume reshards (N → M ranks),
skips damaged checkpoints, and survives kill -9 of a rank during a save.

Also a torchrun script (``python -m torch.distributed.run … -m tests.integration.trainer.test_fsdp_sharded``):
every rank resumes from each checkpoint root given, exactly as the trainer does, and rank 0 writes
the full (gathered) model and optimiser state it ended up with, for comparison with a reference load.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from aidc_trainer import checkpoint as C
from aidc_trainer import checkpoint_resume as R
from aidc_trainer import checkpoint_sharded as S
from aidc_trainer.errors import MissingKeyError
from aidc_trainer.keyring import KeyRing
from tests.integration.trainer.trainer_harness import ROOT, Node, events, make_keys, trainer_env, wait_for

pytestmark = pytest.mark.slow

# ~1.2 M parameters (≈ 15 MB with Adam's two moments); 8 classes so dim 0 of every matrix splits
# evenly over 2 and 4 ranks (an uneven split would make the per-rank byte count uneven by design).
HIDDEN = 16384
MODEL = ["--model-config", json.dumps({"hidden": HIDDEN, "num_classes": 8})]
# This module also runs as a torchrun script (below): its imports, the harness's included, must resolve there.
ENV = trainer_env(PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("trainer", "hack/cluster", ".")))


def _train(
    log: Path, ck: Path, keys: Path | None, nproc: int, steps: int, every: int = 10, keep: int = 100
) -> Node:
    args = ["--parallel", "fsdp", "--eval-every", "0", "--steps", str(steps), *MODEL]
    args += [
        "--checkpoint-dir",
        str(ck),
        "--checkpoint-every-steps",
        str(every),
        "--checkpoint-keep",
        str(keep),
    ]
    args += ["--key-dir", str(keys)] if keys else []
    return Node(log, args, nproc=nproc, env=ENV)


def _ok(node: Node, timeout: float = 240) -> None:
    assert node.wait(timeout=timeout) == 0, node.log.read_text()[-4000:]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Encrypted FSDP checkpoints at steps 10 and 20 written by 2 ranks and by 4 ranks."""
    d = tmp_path_factory.mktemp("sharded")
    keys = make_keys(d)
    out: dict[str, Any] = {"dir": d, "keys": keys, "ring": KeyRing.from_dir(keys)}
    for world in (2, 4):
        _ok(_train(d / f"w{world}.log", d / f"ck{world}", keys, world, 20))
        out[world] = d / f"ck{world}"
    return out


def _probe(log: Path, out: Path, keys: Path | None, nproc: int, roots: list[Path]) -> dict[str, Any]:
    """Resume from each root on ``nproc`` ranks (the script at the bottom); rank 0's results."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "tests.integration.trainer.test_fsdp_sharded", str(out), str(keys or "-"), *map(str, roots)]
    import subprocess

    with open(log, "wb") as f:
        rc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=300, cwd=ROOT
        ).returncode
    assert rc == 0, log.read_text()[-4000:]
    return torch.load(out, weights_only=True)


def _assert_same_as_reference(got: dict[str, Any], ref: C.LoadedCheckpoint) -> None:
    assert set(got["model"]) == set(ref.state["model"])
    for name, t in got["model"].items():
        assert torch.equal(t, ref.state["model"][name]), name
    n = 0
    for fqn, per_param in got["optimizer"]["state"].items():
        for k, t in per_param.items():
            assert torch.equal(t, ref.state["optimizer"][f"state.{fqn}.{k}"]), (fqn, k)
            n += 1
    assert n == 3 * len(got["model"])  # step, exp_avg, exp_avg_sq of every parameter


# ------------------------------------------------------------------------------------------ tests


def test_each_rank_writes_its_own_share_encrypted(saved: dict[str, Any]) -> None:
    ring = saved["ring"]
    for world in (2, 4):
        path = saved[world] / C.step_dir_name(20)
        manifest = C.verify(path, ring)  # MAC, every file's sha256 and every GCM chunk
        assert manifest["format"] == "aidc-checkpoint/2" and manifest["layout"] == "dcp"
        assert manifest["parallelism"] == "fsdp" and manifest["world_size"] == world
        shards = {n: m["size"] for n, m in manifest["files"].items() if n.endswith(".distcp")}
        assert set(manifest["files"]) == {".metadata", *shards} and set(os.listdir(path)) == {
            "manifest.json",
            *manifest["files"],
        }
        total = sum(shards.values())
        per_rank = [sum(s for n, s in shards.items() if n.startswith(f"__{r}_")) for r in range(world)]
        assert sum(per_rank) == total
        for r, b in enumerate(per_rank):  # each rank wrote about 1/world of the state, not all of it
            assert abs(b - total / world) <= 0.1 * total / world, (world, r, per_rank)

    # No plaintext: 64-byte runs of weights from the first and the last rank's slices, found by the
    # same scan in a plain DCP save of those weights (the control), appear nowhere on the volume.
    ref = S.load_full(saved[4] / C.step_dir_name(20), ring)
    w0, w2 = ref.state["model"]["0.weight"], ref.state["model"]["2.weight"]
    needles = [w0[0, :].numpy().tobytes()[:64], w0[-1, :].numpy().tobytes()[:64]]
    needles += [w2[0, :16].numpy().tobytes(), w2[-1, -16:].numpy().tobytes()]
    control = saved["dir"] / "plain"
    import torch.distributed.checkpoint as dcp

    from aidc_trainer.dcp_storage import EncryptedWriter

    with warnings.catch_warnings():  # "no process group: assuming one process", as intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(
            {"model": ref.state["model"]}, storage_writer=EncryptedWriter(control, None, 20), no_dist=True
        )
    assert all(_found(control, n) for n in needles)
    for world in (2, 4):
        assert not any(_found(saved[world], n) for n in needles)


def _found(root: Path, needle: bytes) -> bool:
    return any(needle in p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_resume_on_another_world_size_is_bitwise_equal_to_a_reference_load(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    for written, resumed in ((4, 2), (2, 4)):
        got = _probe(
            tmp_path / f"{written}to{resumed}.log",
            tmp_path / "out.pt",
            saved["keys"],
            resumed,
            [saved[written]],
        )
        root = str(saved[written])
        assert got[root]["step"] == 20
        ref = S.load_full(saved[written] / C.step_dir_name(20), saved["ring"], keys=("model", "optimizer"))
        _assert_same_as_reference(got[root], ref)


def test_training_resumes_from_shards_on_more_ranks(saved: dict[str, Any], tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(saved[2], ck)
    log = tmp_path / "grow.log"
    _ok(_train(log, ck, saved["keys"], 4, 30))
    assert {e["rank"]: e["step"] for e in events(log, "resume")} == {r: 20 for r in range(4)}
    assert events(log, "train")[0]["step"] == 21
    final = C.load_latest(ck, saved["ring"])  # what the model server reads: full tensors in memory
    assert final is not None and final.step == 30 and final.manifest["world_size"] == 4
    model = C.build_model_from_manifest(final.manifest)
    model.load_state_dict(final.state["model"])


DAMAGE = {
    "tampered shard": ("__0_0.distcp", lambda p: _flip(p, p.stat().st_size // 2)),
    "truncated shard": ("__1_0.distcp", lambda p: os.truncate(p, p.stat().st_size // 2)),
    "deleted shard": ("__0_0.distcp", os.remove),
    "deleted .metadata": (".metadata", os.remove),
    "manifest names another factory": ("manifest.json", lambda p: _edit_manifest(p, "model", "factory")),
    "manifest with a repaired hash": ("manifest.json", lambda p: _edit_manifest(p, "files", "__1_0.distcp")),
    "deleted manifest": ("manifest.json", os.remove),
}


def _flip(p: Path, at: int) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0x01
    p.write_bytes(bytes(data))


def _edit_manifest(p: Path, section: str, key: str) -> None:  # the MAC no longer matches
    m = json.loads(p.read_text())
    if section == "model":
        m["model"]["factory"] = "os:system"
    else:
        m["files"][key]["sha256"] = "0" * 64
    p.write_text(json.dumps(m))


def test_a_damaged_shard_or_manifest_is_skipped_and_the_previous_one_used(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    roots = []
    for i, (what, (name, damage)) in enumerate(DAMAGE.items()):
        root = tmp_path / f"case{i}"
        shutil.copytree(saved[2], root)
        damage(root / C.step_dir_name(20) / name)
        roots.append(root)
        # in one process: every file is verified by this rank
        loaded = R.resume(root, saved["ring"], 0, 1)
        assert loaded is not None and loaded.step == 10, what
    # on 2 ranks: each verifies half of the files; all still agree on step 10
    log = tmp_path / "probe.log"
    got = _probe(log, tmp_path / "out.pt", saved["keys"], 2, roots)
    text = log.read_text()
    skips = [line for line in text.splitlines() if "skipping checkpoint step-000000020" in line]
    for root, what in zip(roots, DAMAGE, strict=True):
        assert got[str(root)]["step"] == 10, what
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json"):
        assert any(name in line for line in skips), (name, skips)  # the log names the file
    ref = S.load_full(saved[2] / C.step_dir_name(10), saved["ring"], keys=("model", "optimizer"))
    _assert_same_as_reference(got[str(roots[0])], ref)


def test_a_wrong_or_missing_key_is_a_key_error_not_a_fallback(saved: dict[str, Any]) -> None:
    # the trainer's exit code 3 (MissingKeyError, of which WrongKeyError is a kind), naming the key id
    with pytest.raises(MissingKeyError, match="'k1' is not the key"):
        R.resume(saved[2], KeyRing({"k1": os.urandom(32)}, "k1"), 0, 1)
    with pytest.raises(MissingKeyError, match="key id 'k1' but no key is configured"):
        R.resume(saved[2], None, 0, 1)


def _tmp(ck: Path) -> Path | None:
    return next((p for p in ck.iterdir() if p.name.startswith(".tmp-")), None) if ck.is_dir() else None


def _save_in_progress(ck: Path) -> tuple[list[int], bool] | None:
    """(sizes of the shard files, whether .metadata exists) of the save being written, if any."""
    try:
        t = _tmp(ck)
        if t is None:
            return None
        return [p.stat().st_size for p in t.glob("*.distcp")], (t / ".metadata").exists()
    except OSError:  # renamed into place (or removed) while we looked
        return None


def _at(ck: Path, shard_files: int = 0, min_size: int = 0, metadata: bool = False) -> bool:
    now = _save_in_progress(ck)
    if now is None:
        return False
    sizes, has_metadata = now
    if shard_files == 0:
        return not sizes  # started: planned, nothing written yet
    return len([s for s in sizes if s >= min_size]) >= shard_files and (has_metadata or not metadata)


def _freeze_at(node: Node, moment: Callable[[], bool], attempts: int = 1000) -> None:
    """Stop the workers (SIGSTOP) at ``moment`` of a save. Seeing it and stopping are two steps, in
    which a fast save can move on, so it is checked again while they are stopped; attempts are
    counted, not timed, so a slow or fast machine both get there."""
    for _ in range(attempts):
        wait_for(moment, timeout=180, interval=0.001)
        node.signal_workers(signal.SIGSTOP)
        if moment():
            return
        node.signal_workers(signal.SIGCONT)
    raise AssertionError(f"the save never stayed at the moment for {attempts} attempts")


def test_kill_9_of_a_rank_during_a_save_resumes_from_the_newest_verifiable(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    ring = KeyRing.from_dir(keys)
    ck = tmp_path / "ck"
    _ok(_train(tmp_path / "first.log", ck, keys, 2, 4, every=2))
    shard = max(m["size"] for n, m in C.read_manifest(ck / C.step_dir_name(4), ring)["files"].items())

    # The moments, counted on the save in progress (saves run back to back: one every step).
    moments = {
        "save started, no shard yet": lambda: _at(ck),
        "a shard file created": lambda: _at(ck, 1),
        "a shard half written": lambda: _at(ck, 1, shard // 2),
        "both shard files half written": lambda: _at(ck, 2, shard // 2),
        ".metadata written, no manifest yet": lambda: _at(ck, 2, 1, metadata=True),
    }
    expect, interrupted = 4, 0
    for i, (moment, cond) in enumerate(moments.items()):
        log = tmp_path / f"kill{i}.log"
        node = _train(log, ck, keys, 2, 100000, every=1, keep=3)
        try:
            wait_for(lambda b=expect: max(C._step_of(p) for p in C.list_checkpoints(ck)) > b, timeout=180)
            _freeze_at(node, cond)
            victim = node.workers()[i % 2]
            os.kill(victim, signal.SIGKILL)  # one rank dies; torchrun stops the other
            node.signal_workers(signal.SIGCONT)
            assert node.wait(timeout=120) != 0
        finally:
            if node.proc.poll() is None:
                node.kill()
        interrupted += _tmp(ck) is not None  # the save it hit was left unpublished
        assert [e["step"] for e in events(log, "resume")][:1] == [expect], (moment, events(log, "resume"))
        for p in C.list_checkpoints(ck):  # whatever the kill interrupted, what was published verifies
            C.verify(p, ring)
        expect = C._step_of(C.list_checkpoints(ck)[-1])
    assert interrupted == len(moments), interrupted
    log = tmp_path / "last.log"
    _ok(_train(log, ck, keys, 2, expect + 3, every=1, keep=3))
    assert events(log, "resume")[0]["step"] == expect
    assert C.load_latest(ck, ring).step == expect + 3  # type: ignore[union-attr]
    assert _tmp(ck) is None  # the killed runs' temp directories were cleaned up


def _file_size_limit() -> None:
    # A write past 1 MiB fails with EFBIG (the ENOSPC path without a tiny filesystem); every rank's
    # shard file (~1.9 MB) is larger. SIGXFSZ ignored so that the write fails instead of killing.
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_full_disk_during_a_sharded_save_publishes_nothing_and_exits_6(tmp_path: Path) -> None:
    ck, log = tmp_path / "ck", tmp_path / "full.log"
    args = ["--parallel", "fsdp", "--eval-every", "0", "--steps", "10", *MODEL, "--checkpoint-dir", str(ck)]
    node = Node(log, args, nproc=2, env=ENV, preexec_fn=_file_size_limit)
    assert node.wait(timeout=240) != 0
    assert [e["exit_code"] for e in events(log, "exit")] == [6, 6], log.read_text()[-3000:]
    failed = events(log, "checkpoint_failed")
    assert failed and "File too large" in failed[0]["error"], failed  # the disk's reason, not torch's
    assert C.list_checkpoints(ck) == [] and _tmp(ck) is None  # the torn shards were removed


def test_a_format_1_full_state_fsdp_checkpoint_still_resumes(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from aidc_trainer.examples import mlp

    torch.manual_seed(3)
    model = mlp.build_model(hidden=64, num_classes=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    # what an FSDP job of an earlier release saved: full state, optimiser keyed by parameter name
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    spec = {"factory": mlp.FACTORY, "config": {"in_features": 10, "hidden": 64, "num_classes": 8}}
    res = C.save_checkpoint(tmp_path / "ck", 10, {"model": model_sd, "optimizer": optim_sd}, model_spec=spec)
    assert res.ok
    log = tmp_path / "resume.log"
    args = [
        "--parallel",
        "fsdp",
        "--eval-every",
        "0",
        "--steps",
        "12",
        "--model-config",
        json.dumps(spec["config"]),
    ]
    args += ["--checkpoint-dir", str(tmp_path / "ck")]
    _ok(Node(log, args, nproc=2, env=ENV))
    assert events(log, "resume")[0]["step"] == 10
    final = C.load_latest(tmp_path / "ck", None)
    assert final is not None and final.step == 12 and final.manifest["layout"] == "dcp"
    # the resumed run started from the saved weights: one or two Adam steps away, not a fresh init
    delta = (final.state["model"]["0.weight"] - model_sd["0.weight"]).abs().max().item()
    assert 0 < delta < 0.01


# --------------------------------------------------------------------------------- torchrun probe


def _probe_main(out: str, keys: str, roots: list[str]) -> None:
    import logging

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    from aidc_trainer.examples import mlp

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s rank%(rank)s %(message)s")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    old = logging.getLogRecordFactory()

    def factory(*a: Any, **k: Any) -> logging.LogRecord:
        rec = old(*a, **k)
        rec.rank = rank
        return rec

    logging.setLogRecordFactory(factory)
    group = dist.new_group(backend="gloo")
    ring = KeyRing.from_dir(keys) if keys != "-" else None
    results: dict[str, Any] = {}
    for root in roots:
        torch.manual_seed(1000 + rank)  # a different init than the checkpoint's: loading must overwrite it
        model = mlp.build_model(hidden=HIDDEN, num_classes=8)
        fully_shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loaded = R.resume(Path(root), ring, rank, world, group)
        assert loaded is not None
        S.restore_training_state(loaded, model, opt, None, ring, group, rank, world, fsdp=True)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, opt, options=full)  # a gather: for comparison only
        results[root] = {
            "step": loaded.step,
            "model": model_sd,
            "optimizer": {"state": optim_sd.get("state", {})},
        }
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _probe_main(sys.argv[1], sys.argv[2], sys.argv[3:])
