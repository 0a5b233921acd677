"""The whole test suite on a quiet machine and on a loaded one: tests assert behaviour, not speed.

Runs `make test` (or --command) twice in the same checkout: once quiet, once with a busy loop on every
core at the suite's own priority, and prints both results and the slow-down. A test that goes red only
under load depends on the machine's speed and is a defect (docs/benchmarks.md, "Tests under load").

    .venv/bin/python bench/suite_under_load.py                 # quiet, then loaded (nproc busy loops)
    .venv/bin/python bench/suite_under_load.py --only loaded --busy 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "suite_under_load.json"
SUMMARY = re.compile(r"=+ (.*\b(?:passed|failed|error)\b.*) in [\d.]+s")


def spin() -> None:
    while True:
        pass


def run_suite(command: str, busy: int) -> dict[str, object]:
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
    for s in spinners:
        s.start()
    loads: list[float] = []
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            command, shell=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        summary = ""
        last_sample = 0.0
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if m := SUMMARY.search(line):
                summary = m.group(1)
            if time.monotonic() - last_sample > 30:
                loads.append(os.getloadavg()[0])
                last_sample = time.monotonic()
        rc = proc.wait()
    finally:
        for s in spinners:
            s.kill()
    return {
        "busy_loops": busy,
        "exit_code": rc,
        "summary": summary,
        "wall_seconds": round(time.monotonic() - start, 1),
        "load_average_1m_mean": round(sum(loads) / len(loads), 1) if loads else None,
        "load_average_1m_max": round(max(loads), 1) if loads else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--command", default="make test")
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy loops in the loaded run")
    ap.add_argument("--only", choices=["quiet", "loaded"])
    args = ap.parse_args()
    runs: dict[str, dict[str, object]] = {}
    for mode, busy in (("quiet", 0), ("loaded", args.busy)):
        if args.only in (None, mode):
            print(f"== {mode}: {args.command} with {busy} busy loop(s)", flush=True)
            runs[mode] = run_suite(args.command, busy)
    record = {
        "command": args.command,
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.platform()}",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "runs": runs,
    }
    if "quiet" in runs and "loaded" in runs:
        q, lo = runs["quiet"]["wall_seconds"], runs["loaded"]["wall_seconds"]
        record["slowdown"] = round(float(lo) / float(q), 2)  # type: ignore[arg-type]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    for mode, r in runs.items():
        load = r["load_average_1m_mean"]
        print(f"{mode}: exit {r['exit_code']}, {r['summary']}, {r['wall_seconds']} s, load {load}")
    if "slowdown" in record:
        print(f"loaded / quiet wall time: {record['slowdown']}x")
    return max(int(r["exit_code"]) for r in runs.values())  # type: ignore[call-overload]


if __name__ == "__main__":
    sys.exit(main())
