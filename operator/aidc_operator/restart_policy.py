"""Exit-code classification and restart backoff for a gang.

Retryable: killed by a signal (128+N, e.g. 137 = SIGKILL, the OOM killer's), reason OOMKilled, the
trainer's "lost a peer" code 5, or a code the user listed. Everything else non-zero is a bug or a
configuration error that a restart cannot fix, so the job fails at once with the code and the
container's message (docs/contracts.md has the codes the trainer uses).

torchrun itself exits 1 whenever a worker fails; the worker's own code is in the root-cause report it
prints last (`exitcode  : 3 (pid: …)`), which reaches us as the termination message
(terminationMessagePolicy FallbackToLogsOnError). That code is the one classified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

TRAINER_CODES = {
    3: "checkpoint key missing or wrong",
    4: "invalid training configuration",
    5: "lost a peer rank",
}
NON_RETRYABLE_TRAINER_CODES = {3, 4}
RETRYABLE_TRAINER_CODES = {5}
_ROOT_CAUSE = re.compile(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


@dataclass(frozen=True)
class PodExit:
    pod: str
    node: str | None
    exit_code: int
    reason: str
    message: str


def worker_exit_code(container_code: int, message: str) -> int:
    """The failing worker's exit code: torchrun's root cause when it reported one (a negative code is a
    signal: -9 → 137), else the container's."""
    if container_code == 1 and (m := _ROOT_CAUSE.search(message)):
        code = int(m.group(1))
        return 128 - code if code < 0 else code
    return container_code


def terminated(pod: dict[str, Any]) -> PodExit | None:
    """The first container termination of a Failed pod (or a generic failure when none is recorded)."""
    status = pod.get("status", {})
    if status.get("phase") != "Failed":
        return None
    name = pod["metadata"]["name"]
    node = pod.get("spec", {}).get("nodeName")
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0:
            msg = (term.get("message") or "").strip()
            code = worker_exit_code(int(term["exitCode"]), msg)
            return PodExit(name, node, code, term.get("reason") or "Error", _last_lines(msg))
    # Failed without a container exit: evicted, node shutdown, admission failure …
    return PodExit(
        name, node, 137, status.get("reason") or "PodFailed", (status.get("message") or "")[-1024:]
    )


def _last_lines(message: str, limit: int = 1024) -> str:
    """The end of a log tail, cut at a line boundary so conditions read cleanly."""
    if len(message) <= limit:
        return message
    cut = message[-limit:]
    return cut.split("\n", 1)[-1] if "\n" in cut else cut


def retryable(exit: PodExit, extra_codes: list[int]) -> bool:
    if exit.exit_code in NON_RETRYABLE_TRAINER_CODES:
        return False
    return (
        exit.exit_code >= 128
        or exit.exit_code in RETRYABLE_TRAINER_CODES
        or exit.reason in ("OOMKilled", "Evicted")
        or exit.exit_code in extra_codes
    )


def describe(exit: PodExit) -> str:
    meaning = TRAINER_CODES.get(exit.exit_code)
    text = f"pod {exit.pod} exited with code {exit.exit_code} ({exit.reason}"
    text += f": {meaning})" if meaning else ")"
    return f"{text}: {exit.message}" if exit.message else text


def backoff_seconds(restarts: int, base: int, cap: int) -> int:
    """Delay before restart number `restarts` (1-based): base, 2·base, 4·base … capped."""
    if restarts <= 0:
        return 0
    return min(cap, base * 2 ** min(restarts - 1, 30))
