"""The development kubelet's termination report as a pure function: what a kubelet puts in a
terminated container's message, exit code and reason."""

from __future__ import annotations

from pathlib import Path

import podstatus


def files(tmp_path: Path, message: bytes, log: bytes) -> tuple[Path, Path]:
    (tmp_path / "termination-log").write_bytes(message)
    (tmp_path / "log").write_bytes(log)
    return tmp_path / "termination-log", tmp_path / "log"


def test_the_file_wins_whatever_the_exit_and_only_its_last_4096_bytes(tmp_path: Path) -> None:
    term, log = files(tmp_path, b"a" * 100 + b"b" * 4096, b"log line\n")
    for code in (0, 1):
        for policy in ("File", "FallbackToLogsOnError"):
            assert podstatus.termination_message(term, log, code, policy) == "b" * 4096


def test_log_tail_only_for_a_failure_under_fallback_to_logs(tmp_path: Path) -> None:
    lines = b"".join(b"line %d\n" % i for i in range(200))
    term, log = files(tmp_path, b"", lines)
    tail = podstatus.termination_message(term, log, 3, "FallbackToLogsOnError")
    assert tail.endswith("line 199\n") and len(tail.splitlines()) == 80 and len(tail.encode()) <= 2048
    assert podstatus.termination_message(term, log, 0, "FallbackToLogsOnError") == ""
    assert podstatus.termination_message(term, log, 3, "File") == ""
    assert podstatus.termination_message(tmp_path / "absent", log, 3, "File") == ""


def test_exit_codes_and_reasons_as_a_runtime_reports_them() -> None:
    assert podstatus.exit_code(-9) == 137 and podstatus.exit_code(6) == 6
    done = podstatus.terminated("main", 0, "", now="t")["status"]
    failed = podstatus.terminated("main", 137, "m", now="t")["status"]
    assert (
        done["phase"] == "Succeeded"
        and done["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    )
    assert failed["phase"] == "Failed"
    assert failed["containerStatuses"][0]["state"]["terminated"] == {
        "exitCode": 137,
        "reason": "Error",
        "message": "m",
        "finishedAt": "t",
    }
