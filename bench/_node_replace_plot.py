"""docs/img/node_replace.png from bench/results/node_replace.json: recovery time against gang size, one
line per node-failure policy (bench/node_replace.py). Imported by bench/plot.py (matplotlib)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"RestartGang": "#9e9e9e", "ReplaceNode": "#1f77b4", "ReplaceNode+1 spare": "#2ca02c"}


def node_replace(path: Path) -> Path:
    data = json.loads(path.read_text())
    trials = data["trials"]
    sizes = sorted({t["size"] for t in trials})
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=120)
    for mode, color in COLORS.items():
        med = [
            statistics.median(t["seconds"] for t in trials if t["mode"] == mode and t["size"] == s)
            for s in sizes
        ]
        pods = {t["pods_created"] for t in trials if t["mode"] == mode}
        ax.plot(
            sizes,
            med,
            "o-",
            color=color,
            label=f"{mode} (pods recreated: {'/'.join(map(str, sorted(pods)))})",
        )
        for t in trials:
            if t["mode"] == mode:
                ax.scatter(t["size"], t["seconds"], color=color, s=8, alpha=0.4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("pods in the gang (kwok nodes; the Node under rank 1 deleted at t0)")
    ax.set_ylabel("seconds to every pod Running again")
    ax.set_title("Recovery from a lost node by gang size and policy", fontsize=11)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "node_replace.png"
    fig.savefig(out)
    return out
