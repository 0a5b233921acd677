"""What bench/scale.py measures, apart from the pods: an operator's CPU and memory from /proc, the API
requests it made from the apiserver's audit log, and the request counters it exports itself.

- CPU: utime + stime (+ cutime + cstime: children it has reaped) of the process and every live
  descendant, from /proc/<pid>/stat, in seconds.
- Memory: VmRSS of the same processes, sampled every 0.5 s, peak per phase; VmHWM (the kernel's own
  high-water mark) for the whole run.
- Requests: the audit log holds one Metadata-level event per stage of each request of the audited users
  (never their bodies). A request counts once (by auditID) at its requestReceivedTimestamp, so a watch
  counts when it is opened, however long it stays open.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import statistics
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    # The command name may contain spaces and parentheses: split after the last ')'.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """root and its live descendants."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        tree += frontier
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        # Fields 14-17 of stat (utime stime cutime cstime) are 11-14 after the ')' split.
        total += sum(int(x) for x in f[11:15])
    return total / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class ProcessMeter:
    """CPU and memory of one process tree, by named (possibly overlapping) phases."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self._pids = process_tree(pid)
        self._open: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hwm_kb = 0
        self._thread = threading.Thread(target=self._sample, name=f"meter-{pid}", daemon=True)
        self._thread.start()

    def _rss_kb(self) -> int:
        return sum(_status_kb(p, "VmRSS") for p in self._pids)

    def _sample(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            if n % 10 == 0:
                self._pids = process_tree(self.pid)
            rss = self._rss_kb()
            self._hwm_kb = max(self._hwm_kb, sum(_status_kb(p, "VmHWM") for p in self._pids))
            with self._lock:
                for phase in self._open.values():
                    phase["peak_kb"] = max(phase["peak_kb"], rss)

    def cpu(self) -> float:
        return cpu_seconds(self._pids)

    def begin(self, name: str) -> None:
        with self._lock:
            self._open[name] = {"cpu0": self.cpu(), "t0": time.monotonic(), "peak_kb": self._rss_kb()}

    def end(self, name: str) -> dict[str, float]:
        """cpu_s, wall_s, cpu_per_s and peak_rss_mb of the phase."""
        rss = self._rss_kb()
        with self._lock:
            phase = self._open.pop(name)
        wall = time.monotonic() - phase["t0"]
        cpu = self.cpu() - phase["cpu0"]
        return {
            "cpu_s": round(cpu, 2),
            "wall_s": round(wall, 2),
            "cpu_per_s": round(cpu / wall, 4) if wall > 0 else 0.0,
            "peak_rss_mb": round(max(phase["peak_kb"], rss) / 1024, 1),
        }

    def hwm_mb(self) -> float:
        """The kernel's peak resident set (VmHWM) of the tree, as last seen while it ran."""
        self._hwm_kb = max(self._hwm_kb, sum(_status_kb(p, "VmHWM") for p in self._pids))
        return round(self._hwm_kb / 1024, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------- audit log


def _timestamp(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class AuditLog:
    """The apiserver's JSON audit log, read incrementally: (time, user, verb, resource) per request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._seen: set[str] = set()
        self.requests: list[tuple[float, str, str, str]] = []

    def refresh(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only whole lines; a partly written one is read next time
        self._offset += end
        for line in data[:end].splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("auditID") in self._seen:
                continue
            self._seen.add(e.get("auditID"))
            ref = e.get("objectRef") or {}
            resource = ref.get("resource") or e.get("requestURI", "?").split("?")[0]
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            user = (e.get("user") or {}).get("username", "?")
            self.requests.append(
                (_timestamp(e["requestReceivedTimestamp"]), user, e.get("verb", "?"), resource)
            )

    def count(self, user: str, t0: float, t1: float, settle: float = 1.0) -> dict[str, int]:
        """Requests of `user` received in [t0, t1) (wall clock), by "verb resource"; waits `settle` s
        first when t1 is that recent, since an event is written when its response completes."""
        lag = settle - (time.time() - t1)
        if lag > 0:
            time.sleep(lag)
        self.refresh()
        got = Counter(f"{verb} {res}" for t, u, verb, res in self.requests if u == user and t0 <= t < t1)
        return dict(sorted(got.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- Prometheus

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def prom_counter(url: str, name: str, keys: tuple[str, ...]) -> dict[str, float] | None:
    """Samples of counter `name` at a /metrics url, keyed by the values of label `keys` joined with a
    space; None when the endpoint or the metric is not there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in (name, name + "_total"):
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        key = " ".join(labels.get(k, "") for k in keys).strip() or "-"
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out or None


def counter_delta(after: dict[str, float] | None, before: dict[str, float] | None) -> dict[str, int] | None:
    if after is None:
        return None
    before = before or {}
    delta = {k: round(v - before.get(k, 0.0)) for k, v in after.items()}
    return {k: v for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v}


# ---------------------------------------------------------------- summaries


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no data."""
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(sorted(xs), n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def total(counts: dict[str, Any] | None) -> int | None:
    return None if counts is None else int(sum(counts.values()))
