"""The processes of the development kubelet's pods, found and killed without cgroups.

A container runtime knows a container's processes by its cgroup: deleting the pod, or the machine losing
power, takes every one of them. The development kubelet (local_kubelet.py) runs a pod as plain local
processes, and those do not stay in one process group or session: torchrun starts each worker in a
session of its own, so killing torchrun's group left the workers running (a "dead" node's worker once
trained on for ~10 s and wrote a stop checkpoint). cgroups would solve it (cgroup v2's cgroup.kill), but
whether we may create one differs between machines (the development VM has cgroup v1 and a v2 hierarchy
not mounted for us), so nothing here depends on them.

What every descendant inherits, whatever setsid, double forks or reparenting happen, is the environment:
the kubelet starts each pod's command with marker variables (`markers`), and a process belongs to the
pod (or node) whose markers its /proc/<pid>/environ carries, or whose marked process is its ancestor
(which catches a child exec'd with a clean environment, while it is still parented). The one process
this misses is one that both clears its environment and is orphaned: none of ours do.

A power cut (`power_cut`) SIGSTOPs every matching process, rescanning until a scan finds no new one (a
stopped process cannot fork), then SIGKILLs them all: nothing runs another step between the first kill
and the last, and no process gets to exit gracefully.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

CLUSTER = "AIDC_DEV_CLUSTER"  # the cluster's state dir: two local clusters may both have gpu-node-0
NODE = "AIDC_DEV_NODE"
POD = "AIDC_DEV_POD_UID"


def markers(cluster: str | Path, node: str, pod_uid: str | None = None) -> dict[str, str]:
    """The variables marking a pod's processes (or, without pod_uid, the match for a whole node)."""
    out = {CLUSTER: str(Path(cluster).resolve()), NODE: node}  # one spelling for kubelet and test alike
    if pod_uid is not None:
        out[POD] = pod_uid
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid), or None when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running or stopped; a zombie has released everything but its exit status and counts as dead."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x")


def find(match: Mapping[str, str]) -> set[int]:
    """Every live process whose environment carries all of `match`, and every descendant of one."""
    want = {f"{k}={v}".encode() for k, v in match.items()}
    me = os.getpid()
    parent: dict[int, int] = {}
    marked: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or (pid := int(entry.name)) == me:
            continue
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X", "x"):
            continue
        parent[pid] = st[1]
        try:
            env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:  # gone meanwhile, or not ours to read: not ours to kill either
            continue
        if want <= env:
            marked.add(pid)
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(marked), list(marked)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def send(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait(pids: Iterable[int], done: Callable[[int], bool], timeout: float) -> set[int]:
    """Waits until done(pid) holds for every pid; returns those for which it still does not."""
    left = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in left if not done(p)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.005)


def _stopped(pid: int) -> bool:
    st = _stat(pid)
    return st is None or st[0] in ("T", "t", "Z", "X", "x")


def freeze(match: Mapping[str, str], already: Iterable[int] = ()) -> set[int]:
    """SIGSTOPs every process of `match` and returns them, rescanning until a scan finds no new one.
    kill() returns before the signal is acted on, so each round waits until its processes are really
    stopped (a stopped process cannot fork); one stuck in uninterruptible sleep is not waited for long."""
    frozen = set(already)
    while new := find(match) - frozen:
        send(new, signal.SIGSTOP)
        wait(new, _stopped, timeout=2)
        frozen |= new
    return frozen


def power_cut(match: Mapping[str, str], meanwhile: Callable[[], None] | None = None) -> set[int]:
    """Every process of `match` dies at once, none gracefully: frozen, `meanwhile` run (e.g. kill the
    node's agent), frozen again (anything that started meanwhile), SIGKILLed. Returns the pids killed;
    on return none of them runs (a killed child of another process may wait as a zombie for its reaping)."""
    frozen = freeze(match)
    if meanwhile is not None:
        meanwhile()
    frozen = freeze(match, frozen)
    send(frozen, signal.SIGKILL)
    stuck = wait(frozen, lambda p: not alive(p), timeout=30)
    if stuck:
        raise RuntimeError(f"processes {sorted(stuck)} survived SIGKILL for 30 s")
    return frozen
