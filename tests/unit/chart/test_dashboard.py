"""The Grafana dashboard shipped in the chart queries only metrics the operator, trainer and server
really export, and the chart ships it byte for byte."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from aidc_operator import metrics  # noqa: F401 - registers the operator's metrics in REGISTRY
from aidc_server.energy import EnergyReading
from aidc_server.metrics import ServerMetrics
from aidc_trainer.metrics import TrainMetrics
from localcluster import build_binaries

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "charts" / "aidc-operator" / "dashboards" / "aidc.json"
PROMETHEUS_BUILTINS = {"up"}


def exported(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape of this registry can contain (counters get _total, histograms
    _bucket/_count/_sum), labelled children or not."""
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(family.name)
    return names


def queried() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    names = set()
    for expr in exprs:
        # Metric names: identifiers not followed by '(' (functions) and not PromQL keywords or labels.
        for name in re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", re.sub(r'"[^"]*"|\{[^}]*\}', "", expr)):
            if name.startswith("aidc_") or name in PROMETHEUS_BUILTINS:
                names.add(name)
    return names


def server_registry() -> CollectorRegistry:
    """A server's metrics as a GPU pod exports them (energy measured)."""
    server = ServerMetrics("m")
    server.attach_energy(lambda: EnergyReading(joules=12.5, reason=None, gpus=1))
    return server.registry


def panel_exprs(title: str) -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
    return [t["expr"] for t in panel["targets"]]


def test_every_queried_metric_is_exported() -> None:
    available = exported(REGISTRY) | exported(TrainMetrics().registry) | exported(server_registry())
    missing = queried() - available - PROMETHEUS_BUILTINS
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"
    # And it covers each component.
    assert {n.split("_")[1] for n in queried() if n.startswith("aidc_")} >= {"trainer", "server", "reconcile"}


def test_energy_and_evaluation_panels() -> None:
    """Training energy (joules, joules per step), accuracy/F1, and serving energy per 1,000 inferences."""
    assert any("aidc_trainer_energy_joules" in e for e in panel_exprs("GPU energy (this attempt)"))
    (per_step,) = panel_exprs("Energy per step")
    assert "deriv(aidc_trainer_energy_joules" in per_step and "deriv(aidc_trainer_step" in per_step
    accuracy, f1 = panel_exprs("Evaluation: accuracy and macro-F1")
    assert "aidc_trainer_eval_accuracy" in accuracy and "aidc_trainer_eval_macro_f1" in f1
    (per_1000,) = panel_exprs("Energy per 1,000 inferences")
    assert per_1000.startswith("1000 * ")
    energy, inferences = per_1000.removeprefix("1000 * ").split(" / ")
    assert "increase(aidc_server_energy_joules_total" in energy and "[5m]" in energy
    assert "increase(aidc_server_inferences_total" in inferences and "[5m]" in inferences
    # Both sides are grouped alike, so the division matches series of the same model.
    assert energy.split("(increase")[0] == inferences.split("(increase")[0] == "sum by (namespace, model) "


def test_alert_rules_use_exported_metrics() -> None:
    helm = str(build_binaries() / "helm")
    chart = str(ROOT / "charts" / "aidc-operator")
    out = subprocess.run(
        [helm, "template", "a", chart, "--kube-version=1.34.0", "--set=metrics.prometheusRule.enabled=true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (rule,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PrometheusRule"]
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    available = exported(REGISTRY) | PROMETHEUS_BUILTINS
    used = set()
    for expr in exprs:
        used |= set(re.findall(r"\b(aidc_[a-z0-9_]+|up)\b(?!\s*\()", re.sub(r'"[^"]*"', "", expr)))
    assert used and used <= available, sorted(used - available)
    assert 'up{job="a-aidc-operator-metrics"}' in exprs[0], (
        "the down alert must match the metrics Service's job"
    )


def test_panels_have_unique_ids_and_no_overlap() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


def test_chart_ships_the_dashboard_when_enabled() -> None:
    helm = str(build_binaries() / "helm")
    chart = str(ROOT / "charts" / "aidc-operator")
    out = subprocess.run(
        [helm, "template", "a", chart, "--kube-version=1.34.0", "--set=grafanaDashboard.enabled=true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (cm,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["aidc.json"]) == json.loads(DASHBOARD.read_text())
