"""Renders docs/img/*.png from bench/results/*.json (the numbers the benchmarks wrote), so the docs can
show instead of tell. Needs matplotlib, which the project does not otherwise use: `make plots` runs it
from its own small cached venv."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]


def node_failure() -> Path:
    data = json.loads((ROOT / "bench" / "results" / "node_failure.json").read_text())
    aidc, default = data["aidc_seconds"], data["default_seconds"]
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=120)
    rows = [("default path\n(eviction after 300 s)", default, "#9e9e9e"), ("aidc", aidc, "#1f77b4")]
    for y, (_label, xs, color) in enumerate(rows):
        ax.barh(y, statistics.median(xs), color=color, alpha=0.35, height=0.6)
        ax.scatter(xs, [y] * len(xs), color=color, s=18, zorder=3)
        ax.text(
            max(xs) * 1.15, y, f"median {statistics.median(xs):.1f} s (n={len(xs)})", va="center", fontsize=9
        )
    ax.set_xscale("log")
    ax.set_xlim(5, 1200)
    ax.set_yticks([0, 1], [r[0] for r in rows])
    grace = data["node_monitor_grace_period_s"]
    ax.axvline(grace, color="#d62728", lw=1, ls="--")
    ax.text(
        grace * 1.05,
        0.5,
        f"--node-monitor-grace-period {grace:.0f} s",
        color="#d62728",
        fontsize=8,
        va="center",
    )
    ax.set_xlabel("seconds from node loss to every replica Running on healthy nodes (log scale)")
    ax.set_title(
        f"Node failure recovery, 2-pod gang — {statistics.median(default) / statistics.median(aidc):.0f}x "
        "faster",
        fontsize=11,
    )
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "node_failure.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)
    return out


if __name__ == "__main__":
    print(node_failure())
