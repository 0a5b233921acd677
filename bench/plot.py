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


# The run with every size (run 1); bench/results/scale.json holds the latest run, which may have fewer.
SCALE_CURVE = ROOT / "bench" / "results" / "scale-run1.json"


def scale(path: Path | None = None) -> Path:
    """bench/scale.py's results: aidc and Kubeflow's training-operator, one panel per cost, against N."""
    data = json.loads((path or SCALE_CURVE).read_text())
    runs = [r for r in data["runs"] if not r.get("error")]
    latest_path = ROOT / "bench" / "results" / "scale.json"
    latest = (
        [r for r in json.loads(latest_path.read_text())["runs"] if not r.get("error")]
        if (path is None and latest_path.exists())
        else []
    )
    panels = [
        ("create", "all_running_s", "all 4N pods Running (s)"),
        ("create", "job_latency_p99_s", "job create → all Running, p99 (s)"),
        ("create", "cpu_s", "operator CPU while creating (s)"),
        ("create", "requests", "API requests while creating"),
        ("steady", "requests_per_s", "API requests/s, steady state"),
        ("steady", "cpu_per_s", "operator CPU s/s, steady state"),
        ("delete", "pods_gone_s", "delete all jobs → all pods gone (s)"),
        ("overall", "vm_hwm_mb", "operator peak memory (MB)"),
    ]
    styles = [("aidc", "aidc", "#1f77b4", "o"), ("kubeflow", "Kubeflow training-operator", "#9e9e9e", "s")]
    sizes = sorted({r["size"] for r in runs})
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.4), dpi=120)
    for ax, (section, key, title) in zip(axes.flat, panels, strict=True):
        last: dict[str, tuple[int, float]] = {}
        for op, label, color, marker in styles:
            pts = sorted(
                (r["size"], r[section][key])
                for r in runs
                if r["operator"] == op and isinstance((r.get(section) or {}).get(key), int | float)
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=label, lw=1.5, ms=5)
                last[op] = pts[-1]
        for op, label, color, marker in styles:  # the latest run's points, hollow, where it has them
            pts = [
                (r["size"], r[section][key])
                for r in latest
                if r["operator"] == op and isinstance((r.get(section) or {}).get(key), int | float)
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker=marker,
                    ls="",
                    mfc="none",
                    color=color,
                    ms=8,
                    label=f"{label}, latest run",
                )
                last[op] = max(pts)
        if "aidc" in last and "kubeflow" in last and last["aidc"][0] == last["kubeflow"][0]:
            n, a, k = last["aidc"][0], last["aidc"][1], last["kubeflow"][1]
            if k:
                title += f"\nN={n}: aidc = {a / k:.2f}x Kubeflow"
        ax.set_title(title, fontsize=9)
        if sizes and sizes[-1] >= 5 * sizes[0]:
            ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("jobs (4 pods x 1 GPU each)", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Operators at scale: {data['fleet_nodes'] + data['per_node_nodes']} kwok GPU nodes x "
        f"{data['gpus_per_node']} GPUs, {data['machine']} (lower is better; lines: run 1, all sizes; "
        "hollow: latest run; ratios: latest run at the largest N)",
        fontsize=11,
    )
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "scale.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)
    return out


if __name__ == "__main__":
    print(node_failure())
    if SCALE_CURVE.exists():
        print(scale())
    if (replace_results := ROOT / "bench" / "results" / "node_replace.json").exists():
        from _node_replace_plot import node_replace

        print(node_replace(replace_results))
    if (queueing_results := ROOT / "bench" / "results" / "queueing.json").exists():
        from _queueing_plot import queueing

        print(queueing(queueing_results))
