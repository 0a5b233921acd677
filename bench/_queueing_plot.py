"""docs/img/queueing.png from bench/results/queueing.json: GPUs held over time, Kueue and the scheduler alone.

Run by bench/queueing.py with the plots venv that `make plots` builds (matplotlib is not in the project's
venv): <venv>/bin/python bench/_queueing_plot.py [results.json]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
STYLES = {
    "kueue": ("with Kueue (quota 64 GPUs)", "#1f77b4"),
    "fifo": ("scheduler only + aidc timeout", "#9e9e9e"),
}


def queueing(path: Path) -> Path:
    data = json.loads(path.read_text())
    cap = data["settings"]["pool_gpus"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.4), dpi=120, sharex=True, height_ratios=[3, 2])
    ax, done_ax = axes
    for mode, r in data["runs"].items():
        if not r.get("samples"):
            continue
        label, color = STYLES.get(mode, (mode, "k"))
        t = [x[0] for x in r["samples"]]
        held = [100 * x[1] / cap for x in r["samples"]]
        partial = [100 * x[2] / cap for x in r["samples"]]
        span = (
            f"makespan {r['makespan_s']:.0f} s"
            if r.get("makespan_s")
            else f"{r['outcome']}, {r['jobs_succeeded']} done"
        )
        ax.step(
            t,
            held,
            where="post",
            color=color,
            lw=1.4,
            label=f"{label}: mean {100 * r['allocation_mean']:.0f} %, {span}",
        )
        if any(partial):
            ax.fill_between(
                t,
                partial,
                step="post",
                color=color,
                alpha=0.35,
                lw=0,
                label=f"{label}: held by incomplete gangs",
            )
        done_ax.step(t, [x[3] for x in r["samples"]], where="post", color=color, lw=1.4, label=label)
    ideal = data["mix"]["ideal_makespan_s"]
    ax.axvline(ideal, color="#2ca02c", ls="--", lw=1)
    ax.text(ideal, 103, f" perfect packing {ideal:.0f} s", color="#2ca02c", fontsize=8, va="bottom")
    ax.set_ylim(0, 112)
    ax.set_ylabel("GPUs held (% of 64)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower center", framealpha=0.9)
    done_ax.set_ylabel("jobs Succeeded")
    done_ax.set_xlabel(f"seconds since the {data['settings']['jobs']} jobs were submitted")
    done_ax.grid(alpha=0.3)
    done_ax.legend(fontsize=8, loc="lower right")
    s = data["settings"]
    fig.suptitle(
        f"{s['jobs']} gangs (1-8 nodes x 1-8 GPUs, {s['min_duration']}-{s['max_duration']} s each) "
        f"on {data['pool']}, "
        f"{data['machine']}; timeoutSeconds {s['timeout_seconds']}, backoff {s['backoff_seconds']} s",
        fontsize=10,
    )
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "queueing.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)
    return out


if __name__ == "__main__":
    print(queueing(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "queueing.json"))
