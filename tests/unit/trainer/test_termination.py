"""aidc_trainer.termination: exit code <-> cause mapping and the termination-message line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch.distributed as dist

from aidc_trainer import termination as T
from aidc_trainer.errors import (
    CheckpointCorruptError,
    CheckpointSaveError,
    ConfigError,
    MissingKeyError,
    NoValidCheckpointError,
    Stopped,
    WrongKeyError,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("exc", "cause", "code"),
    [
        (ConfigError("steps must be >= 1"), "InvalidConfig", 4),
        (MissingKeyError("no key 'k9'", "k9"), "CheckpointKeyError", 3),
        (WrongKeyError("key 'k1' is not the key", "k1"), "CheckpointKeyError", 3),
        (Stopped(15), "Stopped", 143),
        (Stopped(9), "Stopped", 137),
        (CheckpointSaveError(40, "OSError: [Errno 28] No space left on device"), "CheckpointSaveFailed", 6),
        (NoValidCheckpointError("none verifies", [("step-000000010", "sha256")]), "NoValidCheckpoint", 7),
        (RuntimeError("[pair.cc:534] Connection closed by peer [10.0.0.7]:40123"), "PeerLost", 5),
        (dist.DistNetworkError("failed to recv"), "PeerLost", 5),
        (RuntimeError("CUDA error: an illegal memory access"), "Error", 1),
        (CheckpointCorruptError("bad", "sha256"), "Error", 1),  # outside resume: a bug, not a policy
        (ValueError("boom"), "Error", 1),
    ],
)
def test_each_exception_maps_to_one_cause_and_its_exit_code(exc: Exception, cause: str, code: int) -> None:
    f = T.classify(exc)
    assert (str(f.cause), f.exit_code) == (cause, code)
    assert T.cause_of(f.exit_code) == f.cause  # exit code and cause always agree


def test_exit_codes_are_the_contract() -> None:
    assert {str(c): n for c, n in T.EXIT_CODES.items()} == {
        "Error": 1,
        "CheckpointKeyError": 3,
        "InvalidConfig": 4,
        "PeerLost": 5,
        "CheckpointSaveFailed": 6,
        "NoValidCheckpoint": 7,
    }
    assert T.cause_of(0) is None and T.cause_of(2) == T.Cause.ERROR and T.cause_of(137) == T.Cause.STOPPED
    with pytest.raises(AssertionError):
        T.Failure(T.Cause.PEER_LOST, 1, "code and cause disagree")


def test_peer_is_the_address_the_error_names() -> None:
    assert T.peer_of(RuntimeError("Connection closed by peer [10.0.0.7]:40123")) == "10.0.0.7:40123"
    assert T.peer_of(RuntimeError("Connection reset by peer [::ffff:10.0.0.7]:99")) == "::ffff:10.0.0.7:99"
    assert T.peer_of(RuntimeError("failed to connect to 10.1.2.3:29500 (timed out)")) == "10.1.2.3:29500"
    assert T.peer_of(RuntimeError("[Rank 1] Watchdog caught collective operation timeout")) is None
    f = T.classify(RuntimeError("Connection closed by peer [10.0.0.7]:40123"))
    assert json.loads(T.record(f, 3))["peer"] == "10.0.0.7:40123"


def test_record_is_one_json_line_with_the_contract_fields() -> None:
    f = T.classify(CheckpointSaveError(40, "OSError: [Errno 30] Read-only file system: '/ck/.tmp'"))
    line = T.record(f, 0)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "cause": "CheckpointSaveFailed",
        "exitCode": 6,
        "rank": 0,
        "message": "final checkpoint at step 40 was not saved: OSError: [Errno 30] Read-only file system: "
        "'/ck/.tmp'",
    }
    assert json.loads(T.record(T.classify(ValueError("x")), None))["rank"] is None


def test_record_is_capped_at_1_kib_keeping_the_newest_checkpoints() -> None:
    cks = [(f"step-{s:09d}", f"sha256: rank-0.bin: {'x' * 500}") for s in range(30, 0, -1)]
    f = T.classify(NoValidCheckpointError("y" * 5000, cks))
    line = T.record(f, 1)
    rec = json.loads(line)
    assert len(line) <= T.MAX_LINE_BYTES
    assert len(rec["message"]) <= T.MAX_MESSAGE_CHARS and rec["message"].endswith("...")
    assert 1 <= len(rec["checkpoints"]) <= T.MAX_CHECKPOINTS
    assert rec["checkpoints"][0]["path"] == "step-000000030"  # newest kept
    assert all(c["reason"].startswith("sha256: rank-0.bin") for c in rec["checkpoints"])
    # escapes (non-ASCII, control characters) cost up to 6 bytes a character: still capped
    line = T.record(T.Failure(T.Cause.ERROR, 1, "\u00e9\x01" * 400, peer="\u00e9" * 90), 0)
    assert len(line) <= T.MAX_LINE_BYTES and json.loads(line)["cause"] == "Error"


def test_a_few_checkpoints_with_short_reasons_are_listed_whole() -> None:
    cks = [("step-000000030", "sha256: rank-0.bin: sha256 does not match the manifest"),
           ("step-000000010", "manifest: incomplete checkpoint: no manifest.json")]  # fmt: skip
    rec = json.loads(T.record(T.classify(NoValidCheckpointError("2 checkpoint(s), none verifies", cks)), 0))
    assert rec["checkpoints"] == [{"path": p, "reason": r} for p, r in cks]
    assert (rec["cause"], rec["exitCode"]) == ("NoValidCheckpoint", 7)


def test_write_appends_one_line_per_call_and_nothing_when_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "termination-log"
    path.write_bytes(b'{"earlier": "line"}\n')
    f = T.classify(Stopped(15))
    assert T.write(f, 0, str(path)) and T.write(f, 1, str(path))
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"earlier": "line"}' and [json.loads(x)["rank"] for x in lines[1:]] == [0, 1]

    monkeypatch.setenv(T.ENV, str(tmp_path / "from-env"))
    assert T.write(f, 0) and (tmp_path / "from-env").read_bytes().count(b"\n") == 1
    monkeypatch.delenv(T.ENV)
    assert not T.write(f, 0)  # no AIDC_TERMINATION_LOG: nothing written anywhere
    assert not T.write(f, 0, str(tmp_path / "no-such-dir" / "log"))  # never raises


def test_concurrent_workers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    cks = [(f"step-{s:09d}", "r" * 90) for s in range(8)]
    f = T.classify(NoValidCheckpointError("m" * 300, cks))

    def worker(rank: int) -> None:
        for _ in range(50):
            T.write(f, rank, str(path))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 400 and all(json.loads(x)["exitCode"] == 7 for x in lines)


def test_rank_is_the_global_rank_under_torchrun_else_0() -> None:
    assert T.rank_from_env({"LOCAL_RANK": "1", "RANK": "5"}) == 5
    assert T.rank_from_env({"RANK": "2"}) == 0  # plain python: one process, rank 0 (RANK = pod index)
    assert T.rank_from_env({"LOCAL_RANK": "0", "RANK": "x"}) is None


def test_the_entry_point_exits_4_and_writes_the_termination_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDC_")}
    env.update(PYTHONPATH=str(ROOT / "trainer"), AIDC_TERMINATION_LOG=str(tmp_path / "t"))
    env["AIDC_ON_NO_VALID_CHECKPOINT"] = "Sometimes"
    cmd = [sys.executable, "-m", "aidc_trainer", "--steps", "5"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 4, out.stderr
    rec = json.loads((tmp_path / "t").read_text())
    assert (rec["cause"], rec["exitCode"], rec["rank"]) == ("InvalidConfig", 4, 0)
    assert "on_no_valid_checkpoint must be Fail|StartFresh" in rec["message"]
    exit_event = [json.loads(x) for x in out.stderr.splitlines() if '"event": "exit"' in x]
    assert exit_event[0]["cause"] == "InvalidConfig" and exit_event[0]["exit_code"] == 4


# c10d and CUDA errors append a C++ stack to their message: ~1.5 KB in a condition before the fix.
_CPP_STACK = "\nException raised from recvBytes at ../torch/csrc/distributed/c10d/Utils.hpp:672" + "".join(
    f"\nframe #{i}: c10::Error::Error(c10::SourceLocation, std::string) + 0x{i:x}" for i in range(20)
)


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            RuntimeError("[pair.cc:534] Connection closed by peer [10.0.0.7]:40123" + _CPP_STACK),
            "lost a peer: [pair.cc:534] Connection closed by peer [10.0.0.7]:40123",
        ),
        (
            RuntimeError("CUDA error: an illegal memory access was encountered" + _CPP_STACK),
            "training failed: RuntimeError: CUDA error: an illegal memory access was encountered",
        ),
        (ValueError(), "training failed: ValueError"),
        (ConfigError("\n  steps must be >= 1\n(see --help)"), "invalid training config: steps must be >= 1"),
    ],
)
def test_the_termination_message_is_the_cause_and_the_errors_first_line(exc: Exception, message: str) -> None:
    line = T.record(T.classify(exc), 0)
    assert line.count(b"\n") == 1 and json.loads(line)["message"] == message
    cks = [("step-000000010", "sha256: rank-0.bin\ndoes not match")]
    rec = json.loads(
        T.record(T.Failure(T.Cause.NO_VALID_CHECKPOINT, 7, "none\nverifies", checkpoints=cks), 0)
    )
    assert rec["message"] == "none" and rec["checkpoints"][0]["reason"] == "sha256: rank-0.bin"


def test_a_script_error_is_one_line_for_the_operator_and_a_whole_traceback_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from aidc_trainer import launch

    def boom(_cfg: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered" + _CPP_STACK)

    monkeypatch.setattr("aidc_trainer.trainer.run", boom)
    monkeypatch.setenv(T.ENV, str(tmp_path / "t"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert launch.main(["--steps", "5"]) == 1
    finally:  # main() installs the JSON handler on the root logger
        root.handlers[:] = handlers
        root.setLevel(level)
    written = (tmp_path / "t").read_text()
    assert written.count("\n") == 1 and len(written) < 200
    assert json.loads(written)["message"] == (
        "training failed: RuntimeError: CUDA error: an illegal memory access was encountered"
    )
    logged = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    exit_event = next(x for x in logged if x.get("event") == "exit")
    assert "Traceback" in exit_event["exc"] and "frame #19" in exit_event["exc"]  # the log has it all
