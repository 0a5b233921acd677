"""Checkpoint faults that decide how a run ends: a final save that cannot land (exit 6) and a
checkpoint directory where nothing verifies (exit 7, or StartFresh). Real torchrun, real files."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from aidc_trainer import checkpoint as C
from aidc_trainer.keyring import KeyRing
from tests.integration.trainer.trainer_harness import (
    Node,
    events,
    make_keys,
    termination_lines,
    trainer_env,
    tree_digest,
)

pytestmark = pytest.mark.slow


def _run(log: Path, args: list[str], env: dict[str, str], timeout: float = 240, **kw: object) -> int:
    node = Node(log, args, nproc=2, env=env, **kw)  # type: ignore[arg-type]
    try:
        return node.wait(timeout=timeout)
    finally:
        if node.proc.poll() is None:
            node.kill()


def _args(ck: Path, steps: int, *extra: str) -> list[str]:
    return ["--steps", str(steps), "--batch-size", "16", "--eval-every", "0", "--checkpoint-dir", str(ck),
            "--checkpoint-every-steps", "10", *extra]  # fmt: skip


def _assert_reports_only_real_checkpoints(ck: Path) -> None:
    """progress.json (the pod annotation outside a cluster) never names a checkpoint that is gone."""
    report = ck / "progress.json"
    if report.exists():
        last = json.loads(report.read_text()).get("aidc.dev/last-checkpoint")
        if last is not None:
            assert Path(last["path"]).is_dir() and (Path(last["path"]) / "manifest.json").is_file(), last


# ------------------------------------------------------------------------ exit 6: save failed


def _read_only(ck: Path) -> tuple[list[str], Callable[[], None]]:
    """A command prefix under which ``ck`` is really read-only, and how to undo it."""
    if os.geteuid() != 0:
        mode = ck.stat().st_mode
        ck.chmod(0o555)  # EACCES for a normal user
        return [], lambda: ck.chmod(mode)
    # Root ignores permission bits. A read-only bind mount in a private mount namespace (an
    # unprivileged user namespace maps us to root there) fails writes with EROFS, exactly like a
    # volume mounted read-only, and vanishes with the processes.
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(ck)]
    probe = f"touch {shlex.quote(str(ck / '.probe'))} 2>/dev/null && exit 3 || exit 0"
    if not shutil.which("unshare") or subprocess.run([*prefix, "sh", "-c", probe]).returncode != 0:
        pytest.skip("running as root without user+mount namespaces: cannot make a volume read-only")
    return prefix, lambda: None


def test_final_save_on_a_read_only_volume_exits_6_and_reports_only_real_checkpoints(
    tmp_path: Path,
) -> None:
    ck, term = tmp_path / "ck", tmp_path / "termination-log"
    env = trainer_env(AIDC_TERMINATION_LOG=str(term))
    assert _run(tmp_path / "first.log", _args(ck, 20), env) == 0
    before = [p.name for p in C.list_checkpoints(ck)]
    assert before == ["step-000000010", "step-000000020"] and not term.exists()  # exit 0 writes nothing

    prefix, undo = _read_only(ck)
    log = tmp_path / "ro.log"
    try:
        rc = _run(log, _args(ck, 40), env, prefix=prefix)
    finally:
        undo()
    assert rc != 0, log.read_text()[-3000:]
    assert events(log, "resume")[0]["step"] == 20
    # the periodic save at 30 failed and training went on; the final one at 40 decides the exit
    failed = {e["step"] for e in events(log, "checkpoint_failed")}
    assert {30, 40} <= failed, failed
    assert [e["exit_code"] for e in events(log, "exit")] == [6, 6]  # rank 0's failure told to rank 1
    assert not events(log, "done")
    lines = termination_lines(term)
    assert sorted(x["rank"] for x in lines) == [0, 1]
    for x in lines:
        assert x["cause"] == "CheckpointSaveFailed" and x["exitCode"] == 6
        assert "final checkpoint at step 40 was not saved" in x["message"]
        assert "Read-only file system" in x["message"] or "Permission denied" in x["message"], x
    assert [p.name for p in C.list_checkpoints(ck)] == before
    _assert_reports_only_real_checkpoints(ck)


def _file_size_limit() -> None:
    # RLIMIT_FSIZE makes a write past 256 KiB fail with EFBIG: the same OSError-from-write path as
    # ENOSPC, without a root-only tiny filesystem. Ignoring SIGXFSZ survives exec into torchrun.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_disk_full_during_the_final_save_exits_6(tmp_path: Path) -> None:
    ck, term = tmp_path / "ck", tmp_path / "termination-log"
    env = trainer_env(AIDC_TERMINATION_LOG=str(term))
    # ~1 MB of model + Adam state for rank 0: every save hits the limit; rank 1's small file fits
    args = _args(ck, 20, "--model-config", '{"hidden": 4096}')
    log = tmp_path / "full.log"
    assert _run(log, args, env, preexec_fn=_file_size_limit) != 0, log.read_text()[-3000:]
    assert [e["exit_code"] for e in events(log, "exit")] == [6, 6]
    lines = termination_lines(term)
    assert len(lines) == 2 and {x["cause"] for x in lines} == {"CheckpointSaveFailed"}
    assert all("step 20" in x["message"] and "File too large" in x["message"] for x in lines), lines
    assert C.list_checkpoints(ck) == [] and not [p for p in ck.iterdir() if p.name.startswith(".tmp-")]
    _assert_reports_only_real_checkpoints(ck)


# --------------------------------------------------------------- exit 7: nothing verifies


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three encrypted checkpoints (10, 20, 30) of a 2-rank run, each damaged differently, plus a
    stale temp dir and the run's progress.json."""
    base = tmp_path_factory.mktemp("damaged")
    keys, ck = make_keys(base), base / "ck"
    log = base / "train.log"
    assert _run(log, _args(ck, 30, "--key-dir", str(keys)), trainer_env()) == 0, log.read_text()[-3000:]
    assert [p.name for p in C.list_checkpoints(ck)] == [f"step-0000000{s}" for s in (10, 20, 30)]
    blob = bytearray((ck / "step-000000030/rank-0.bin").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # bit rot in the shared state: every rank sees it
    (ck / "step-000000030/rank-0.bin").write_bytes(bytes(blob))
    r1 = ck / "step-000000020/rank-1.bin"
    r1.write_bytes(r1.read_bytes()[:-64])  # only rank 1 reads its own file: rank 0 must learn why
    (ck / "step-000000010/manifest.json").unlink()
    (ck / ".tmp-step-000000040-deadbeef").mkdir()
    (ck / ".tmp-step-000000040-deadbeef/rank-0.bin").write_bytes(b"half a save")
    return base


def _copy(damaged: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(damaged / "ck", tmp_path / "ck")
    shutil.copytree(damaged / "keys", tmp_path / "keys")
    return tmp_path / "ck", tmp_path / "keys"


def test_no_valid_checkpoint_exits_7_listing_why_and_touches_nothing(damaged: Path, tmp_path: Path) -> None:
    ck, keys = _copy(damaged, tmp_path)
    term = tmp_path / "termination-log"
    before = tree_digest(ck)
    log = tmp_path / "run.log"
    rc = _run(log, _args(ck, 60, "--key-dir", str(keys)), trainer_env(AIDC_TERMINATION_LOG=str(term)))
    assert rc != 0, log.read_text()[-3000:]
    assert [e["exit_code"] for e in events(log, "exit")] == [7, 7]  # both ranks refuse, none trains
    assert not events(log, "train") and not events(log, "start")
    assert tree_digest(ck) == before  # byte for byte: no cleanup, no progress report, no save
    lines = termination_lines(term)
    assert sorted(x["rank"] for x in lines) == [0, 1]
    for x in lines:
        assert x["cause"] == "NoValidCheckpoint" and x["exitCode"] == 7
        assert "3 checkpoint(s)" in x["message"] and "none verifies" in x["message"]
        reasons = {c["path"]: c["reason"] for c in x["checkpoints"]}
        assert list(reasons) == ["step-000000030", "step-000000020", "step-000000010"]  # newest first
        assert reasons["step-000000030"].startswith("sha256")
        assert "truncated" in reasons["step-000000020"]
        assert reasons["step-000000010"] == "manifest: incomplete checkpoint: no manifest.json"
    rank0 = next(x for x in lines if x["rank"] == 0)
    assert rank0["checkpoints"][1]["reason"].startswith("rank 1: truncated")


def test_start_fresh_moves_damaged_checkpoints_aside_and_trains_from_step_0(
    damaged: Path, tmp_path: Path
) -> None:
    ck, keys = _copy(damaged, tmp_path)
    steps = {f"step-0000000{s}" for s in (10, 20, 30)}
    before = {k: v for k, v in tree_digest(ck).items() if k.split("/")[0] in steps}
    log = tmp_path / "run.log"
    args = _args(ck, 20, "--key-dir", str(keys), "--on-no-valid-checkpoint", "StartFresh")
    assert _run(log, args, trainer_env()) == 0, log.read_text()[-3000:]

    moved = events(log, "checkpoints_moved_aside")
    assert len(moved) == 1 and set(moved[0]["names"]) == steps and moved[0]["level"] == "warning"
    aside = [p for p in ck.iterdir() if p.name.startswith("damaged-")]
    assert [p.name for p in aside] == [moved[0]["to"]]
    # still there, same bytes, just out of the way of resume, pruning and the model server
    assert tree_digest(aside[0]) == before
    assert {e["step"] for e in events(log, "resume")} == {0}
    assert events(log, "train")[0]["step"] == 1 and events(log, "done")[0]["step"] == 20
    final = C.load_latest(ck, KeyRing.from_dir(keys))
    assert final is not None and final.step == 20
    assert [p.name for p in C.list_checkpoints(ck)] == ["step-000000010", "step-000000020"]
    _assert_reports_only_real_checkpoints(ck)
