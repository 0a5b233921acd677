"""Exit-code classification and restart backoff for a gang.

Retryable: killed by a signal (128+N, e.g. 137 = SIGKILL, the OOM killer's), reason OOMKilled, or a code
the user listed. Everything else non-zero is a bug or a configuration error that a restart cannot fix,
so the job fails at once with the code and the container's message (docs/contracts.md has the codes
the trainer uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NON_RETRYABLE_TRAINER_CODES = {3: "checkpoint key missing or wrong", 4: "invalid training configuration"}


@dataclass(frozen=True)
class PodExit:
    pod: str
    node: str | None
    exit_code: int
    reason: str
    message: str


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
            return PodExit(name, node, int(term["exitCode"]), term.get("reason") or "Error", msg[-1024:])
    # Failed without a container exit: evicted, node shutdown, admission failure …
    return PodExit(
        name, node, 137, status.get("reason") or "PodFailed", (status.get("message") or "")[-1024:]
    )


def retryable(exit: PodExit, extra_codes: list[int]) -> bool:
    if exit.exit_code in NON_RETRYABLE_TRAINER_CODES:
        return False
    return exit.exit_code >= 128 or exit.reason in ("OOMKilled", "Evicted") or exit.exit_code in extra_codes


def describe(exit: PodExit) -> str:
    meaning = NON_RETRYABLE_TRAINER_CODES.get(exit.exit_code)
    text = f"pod {exit.pod} exited with code {exit.exit_code} ({exit.reason}"
    text += f": {meaning})" if meaning else ")"
    return f"{text}: {exit.message}" if exit.message else text


def backoff_seconds(restarts: int, base: int, cap: int) -> int:
    """Delay before restart number `restarts` (1-based): base, 2·base, 4·base … capped."""
    if restarts <= 0:
        return 0
    return min(cap, base * 2 ** min(restarts - 1, 30))
