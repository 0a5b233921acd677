"""Exit classification and restart backoff for a gang.

Every exit of an attempt is classified and the most severe class decides (`Severity`):
non-retryable > (a lost node, judged by the planner) > retryable > peer-lost.

- non-retryable: a bug or a configuration error a restart cannot fix (the trainer's codes 3, 4, 7 and any
  other non-zero code the user did not list);
- retryable: killed by a signal (128+N, e.g. 137 = SIGKILL, the OOM killer's), reason OOMKilled/Evicted,
  the trainer's 6 (its final checkpoint could not be published), or a code the user listed;
- peer-lost: the trainer's 5, or a gloo/NCCL connection error from a script that is not ours. The rank
  itself is healthy: another rank or its node went away. Such an exit is held until the gang's nodes
  are judged (lifecycle), so a lost node is counted as a node failure and not as this rank's failure.

A port another process holds (EADDRINUSE: "Address already in use", e.g. two jobs' rendezvous ports on
one host) is a clash that goes away, not a bug: retryable, cause AddressInUse.

What reaches a condition or an Event is one line: the cause and a one-line summary (a traceback's
exception line), bounded; the full termination message goes to the operator log at debug level only.

The aidc trainer appends a JSON line per failing worker to the container's termination message
(docs/contracts.md § Termination message): its cause and rank are read there, never from error text.
For other trainers torchrun's root-cause report (`exitcode : 3 (pid: …)`, the termination message under
FallbackToLogsOnError) gives the worker's own code instead of torchrun's 1.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

TRAINER_CODES = {
    3: "checkpoint key missing or wrong",
    4: "invalid training configuration",
    5: "lost a peer rank",
    6: "checkpoint could not be saved",
    7: "no checkpoint verifies",
}
NON_RETRYABLE_TRAINER_CODES = {3, 4, 7}
RETRYABLE_TRAINER_CODES = {6}
PEER_LOST_CODE = 5
# Words a collective library uses when the other end of a connection went away, for scripts that
# are not the aidc trainer (which reports the cause itself); and torchrun's agent losing the c10d
# rendezvous store, which lives in the rank-0 pod's agent: that pod's node died, or the job ended under
# a standby spare.
_PEER_LOST_TEXT = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|NCCL communicator was aborted|remote process exited"
    r"|RendezvousConnectionError|connection to the C10d store has failed"
)
_ADDRESS_IN_USE = re.compile(r"EADDRINUSE|Address already in use", re.IGNORECASE)
ADDRESS_IN_USE = "AddressInUse"
# A traceback's last word: `pkg.mod.SomeError: what happened` (torchrun may prefix `[rank0]: `).
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt):\s*\S")
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s*")
_BOILERPLATE = re.compile(r"^(?:[=-]{3,}|Traceback \(most recent call last\):|File \"|\w+\s*:\s*<N/A>$)")
SUMMARY_LIMIT = 240  # the free-text part of a failure message
MESSAGE_LIMIT = 1024  # a whole condition or Event message
_ROOT_CAUSE = re.compile(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)
_ROOT_RANK = re.compile(r"Root Cause.*?rank\s*:\s*(\d+)", re.DOTALL)
log = logging.getLogger("aidc.restart_policy")


class Severity(enum.IntEnum):
    PEER_LOST = 0
    RETRYABLE = 1
    NODE_LOST = 2  # decided by the planner from node health, never by an exit
    NON_RETRYABLE = 3


@dataclass(frozen=True)
class PodExit:
    pod: str
    node: str | None
    exit_code: int
    reason: str
    message: str
    cause: str | None = None  # the trainer's own word (PeerLost, NoValidCheckpoint …), when it gave one
    rank: int | None = None
    peer_lost: bool = False


def trainer_reports(message: str) -> list[dict[str, Any]]:
    """The trainer's structured exit reports in a termination message (one JSON object per line)."""
    reports = []
    for line in message.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict) and isinstance(report.get("exitCode"), int) and report.get("cause"):
            reports.append(report)
    return reports


def worker_exit_code(container_code: int, message: str) -> int:
    """The failing worker's exit code: torchrun's root cause when it reported one (a negative code is a
    signal: -9 → 137), else the container's."""
    if container_code == 1 and (m := _ROOT_CAUSE.search(message)):
        code = int(m.group(1))
        return 128 - code if code < 0 else code
    return container_code


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Whitespace and line breaks collapsed, cut to limit characters (an ellipsis marks the cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def summary(text: str, limit: int = SUMMARY_LIMIT) -> str:
    """What a log tail or termination message says went wrong, in one line: the last exception line
    that says something (torchrun's own ChildFailedError says nothing the exit code does not), else
    the last line that is not a traceback frame or a separator."""
    lines = [_RANK_PREFIX.sub("", line.strip()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line) and "ChildFailedError" not in line:
            return one_line(line, limit)
    for line in reversed(lines):
        if not _BOILERPLATE.match(line) and not line.startswith("traceback"):
            return one_line(line, limit)
    return ""


def _report_text(report: dict[str, Any]) -> str:
    text = summary(str(report.get("message") or ""), 400)
    files = report.get("checkpoints")
    if isinstance(files, list) and files:
        listed = "; ".join(f"{f.get('path')}: {f.get('reason')}" for f in files[:8] if isinstance(f, dict))
        text = f"{text} [{listed}]" if text else listed
    if report.get("peer"):
        text += f" (peer: {report['peer']})"
    return one_line(text)


def _cause(code: int, cause: str | None, text: str) -> str | None:
    """An exit the trainer did not classify (its codes 3-7 are its own word) that a port clash caused."""
    if code not in TRAINER_CODES and _ADDRESS_IN_USE.search(text):
        return ADDRESS_IN_USE
    return cause


def _from_reports(name: str, node: str | None, reason: str, reports: list[dict[str, Any]]) -> PodExit:
    exits = [
        PodExit(
            name,
            node,
            int(r["exitCode"]),
            reason,
            _report_text(r),
            _cause(int(r["exitCode"]), str(r["cause"]), str(r.get("message") or "")),
            r["rank"] if isinstance(r.get("rank"), int) else None,
            int(r["exitCode"]) == PEER_LOST_CODE,
        )
        for r in reports
    ]
    return worst(exits, [])


def terminated(pod: dict[str, Any]) -> PodExit | None:
    """How a Failed pod's trainer exited (a generic failure when no container exit is recorded)."""
    status = pod.get("status", {})
    if status.get("phase") != "Failed":
        return None
    name = pod["metadata"]["name"]
    node = pod.get("spec", {}).get("nodeName")
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0:
            msg = (term.get("message") or "").strip()
            reason = term.get("reason") or "Error"
            if msg:  # the whole text (a traceback, a log tail) is for the log, never a condition
                log.debug("pod %s terminated (%s): %s", name, reason, msg)
            if reports := trainer_reports(msg):
                return _from_reports(name, node, reason, reports)
            code = worker_exit_code(int(term["exitCode"]), msg)
            rank = int(m.group(1)) if (m := _ROOT_RANK.search(msg)) else None
            peer_lost = code == PEER_LOST_CODE or bool(_PEER_LOST_TEXT.search(msg))
            return PodExit(name, node, code, reason, summary(msg), _cause(code, None, msg), rank, peer_lost)
    # Failed without a container exit: evicted, node shutdown, admission failure …
    return PodExit(name, node, 137, status.get("reason") or "PodFailed", summary(status.get("message") or ""))


def retryable(exit: PodExit, extra_codes: list[int]) -> bool:
    if exit.exit_code in NON_RETRYABLE_TRAINER_CODES:
        return False
    return (
        exit.cause == ADDRESS_IN_USE
        or exit.exit_code >= 128
        or exit.exit_code in RETRYABLE_TRAINER_CODES
        or exit.exit_code == PEER_LOST_CODE
        or exit.reason in ("OOMKilled", "Evicted")
        or exit.exit_code in extra_codes
    )


def severity(exit: PodExit, extra_codes: list[int], verdict_due: bool = False) -> Severity:
    """The class of one exit. A peer-lost exit stays PEER_LOST until the verdict on the gang's nodes is
    due (verdict_due); then, no node having been lost, its own code decides."""
    if exit.peer_lost and not verdict_due:
        return Severity.PEER_LOST
    return Severity.RETRYABLE if retryable(exit, extra_codes) else Severity.NON_RETRYABLE


def worst(exits: list[PodExit], extra_codes: list[int], verdict_due: bool = False) -> PodExit:
    """The exit that decides the attempt: the most severe, the first seen among equals."""
    return max(exits, key=lambda e: severity(e, extra_codes, verdict_due))


def describe(exit: PodExit) -> str:
    meaning = TRAINER_CODES.get(exit.exit_code)
    who = f"pod {exit.pod}" + (f" (rank {exit.rank})" if exit.rank is not None else "")
    if exit.node:
        who += f" on node {exit.node}"
    text = f"{who} exited with code {exit.exit_code} ({exit.cause or exit.reason}"
    text += f": {meaning})" if meaning else ")"
    return one_line(f"{text}: {exit.message}" if exit.message else text)


def backoff_seconds(restarts: int, base: int, cap: int) -> int:
    """Delay before restart number `restarts` (1-based): base, 2·base, 4·base … capped."""
    if restarts <= 0:
        return 0
    return min(cap, base * 2 ** min(restarts - 1, 30))
