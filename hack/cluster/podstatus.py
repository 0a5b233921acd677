"""What the development kubelet (local_kubelet.py) writes to a pod's status, as a kubelet writes it.

Pure functions (the kubelet does the I/O): the terminated state of an exited container, with the
termination message a kubelet reads (the container's terminationMessagePath file, else under
FallbackToLogsOnError the log tail of a failed container), the Ready verdict of a readiness probe, and
the probe itself.
"""

from __future__ import annotations

import datetime as dt
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
# The kubelet's limits (kubecontainer.MaxContainerTerminationMessageLength, ...LogLength, ...LogLines).
MAX_MESSAGE_BYTES = 4096
MAX_LOG_TAIL_BYTES = 2048
MAX_LOG_TAIL_LINES = 80


def timestamp() -> str:
    """Now, as the kubelet writes times into pod status."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tail(path: Path, limit: int) -> bytes:
    """The last `limit` bytes of a file (what the kubelet's tail.ReadAtMost reads); b"" if it is absent."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - limit))
            return f.read()
    except OSError:
        return b""


def exit_code(returncode: int) -> int:
    """Popen's -N for death by signal N is what a container runtime reports as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def termination_message(termination_log: Path, log: Path, code: int, policy: str) -> str:
    """The container's termination-log file (at most its last 4096 bytes) when it is not empty; else,
    for a failed container under FallbackToLogsOnError, the tail of its log (80 lines, 2048 bytes)."""
    if data := tail(termination_log, MAX_MESSAGE_BYTES):
        return data.decode(errors="replace")
    if code != 0 and policy == "FallbackToLogsOnError":
        lines = tail(log, MAX_LOG_TAIL_BYTES).decode(errors="replace").splitlines(keepends=True)
        return "".join(lines[-MAX_LOG_TAIL_LINES:])
    return ""


def terminated(container: str, code: int, message: str, now: str | None = None) -> dict[str, Any]:
    """The status patch for a container that exited with `code` (already 128 + N for a signal)."""
    now = now or timestamp()
    return {
        "status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
            "containerStatuses": [
                {
                    "name": container,
                    "image": "local",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": code,
                            "reason": "Completed" if code == 0 else "Error",
                            "message": message,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
    }


def readiness(container: str, ready: bool, now: str | None = None) -> dict[str, Any]:
    """The status patch for a readiness verdict, where the endpoint and deployment controllers read it."""
    now = now or timestamp()
    value = "True" if ready else "False"
    return {
        "status": {
            "conditions": [
                {"type": t, "status": value, "lastTransitionTime": now} for t in ("Ready", "ContainersReady")
            ],
            "containerStatuses": [
                {
                    "name": container,
                    "image": "local",
                    "imageID": "",
                    "ready": ready,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": now}},
                }
            ],
        }
    }


def probe_ok(address: str, probe: dict[str, Any], ports: dict[str, int]) -> bool:
    """One HTTP readiness probe, as a kubelet runs it: any 2xx/3xx is success; TLS not verified."""
    get = probe["httpGet"]
    port = get["port"] if isinstance(get["port"], int) else ports.get(get["port"], 0)
    scheme = get.get("scheme", "HTTP").lower()
    ctx = None
    if scheme == "https":  # a kubelet does not verify a probe's certificate either
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    url = f"{scheme}://{address}:{port}{get.get('path', '/')}"
    try:
        with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1), context=ctx) as r:
            return 200 <= r.status < 400
    except (OSError, urllib.error.URLError, ValueError):
        return False
