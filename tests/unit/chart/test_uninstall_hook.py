"""The chart's pre-delete hook and the subcommand it runs (operator/aidc_operator/release.py): the Job's
arguments are ones the subcommand accepts, and only the operator's finalizer is removed.
tests/e2e/test_helm_install.py runs the hook's command against the local cluster."""

from __future__ import annotations

import subprocess
import sys

import yaml

from aidc_operator.release import FINALIZER, without_finalizer
from localcluster import build_binaries
from tests.unit.chart.test_chart import CHART, ROOT


def test_only_the_operators_finalizer_is_removed() -> None:
    assert without_finalizer([FINALIZER, "example.com/keep"]) == ["example.com/keep"]
    assert without_finalizer([FINALIZER]) == []
    assert without_finalizer(["example.com/keep"]) is None  # nothing to write
    assert without_finalizer(None) is None


def test_hook_job_runs_the_release_subcommand_for_the_served_namespaces() -> None:
    values = ["--set=watchNamespaces={team-a,team-b}", "--show-only=templates/uninstall-hook.yaml"]
    out = subprocess.run(
        [str(build_binaries() / "helm"), "template", "aidc", str(CHART), "-n", "aidc-system", *values],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (job,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "release" and "--namespace=team-a" in args and "--namespace=team-b" in args
    help_ = subprocess.run(
        [sys.executable, "-m", "aidc_operator", *args, "--help"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "operator")},
        timeout=60,
    )
    assert help_.returncode == 0 and "--deployment" in help_.stdout, help_.stderr
