"""HA: two operator replicas peered through a KopfPeering object. The older replica is active, the other
stands by; kill -9 the active one and the standby takes over within the peering lifetime, adopting the
running gang without duplicating a pod and reconciling new jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_processes import free_port
from tests.conftest import ROOT, OperatorProcess
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LIFETIME = 10  # seconds; the chart's default is 20
PEERING = "aidc-ha"


class PeeredOperator(OperatorProcess):
    """An operator replica with peering (OperatorProcess runs --standalone)."""

    def __init__(self, kube: Kube, log_path: Path, namespace: str, replica: str) -> None:
        super().__init__(kube, log_path, [namespace])
        self.replica = replica

    def start(self) -> PeeredOperator:
        self.health_port = free_port()
        args = [sys.executable, "-m", "aidc_operator", f"--peering={PEERING}", "--metrics-port=0"]
        args += [f"--health-port={self.health_port}", f"--namespace={self.namespaces[0]}"]
        env = {
            **self.kube.env(),
            "PYTHONPATH": str(ROOT / "operator"),
            "POD_ID": self.replica,  # kopf's identity in the peering object
            "AIDC_PEERING_LIFETIME": str(LIFETIME),
        }
        self.proc = subprocess.Popen(
            args, env=env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT
        )
        wait_for(f"{self.replica} liveness endpoint", self._healthy, timeout=60)
        return self


def create_job(kube: Kube, ns: str, name: str, nodes: int) -> None:
    body = {
        "apiVersion": "aidc.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"nodes": nodes, "command": ["python", "-m", "aidc_trainer", "--example", "mlp"]},
    }
    kube.custom.create_namespaced_custom_object("aidc.dev", "v1alpha1", ns, "trainingjobs", body)


def gang_uids(kube: Kube, ns: str, job: str) -> set[str]:
    return {p.metadata.uid for p in kube.pods(ns, f"aidc.dev/job-name={job}")}


def phase(kube: Kube, ns: str, job: str) -> str | None:
    return (kube.get_cr("trainingjobs", ns, job).get("status") or {}).get("phase")


def test_standby_takes_over_within_the_peering_lifetime(crds: Kube, tmp_path: Path) -> None:
    kube = crds
    kube.wait_crds("kopfpeerings.kopf.dev")
    ns = kube.create_namespace("ha", prefix="o")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(peering))
    a = PeeredOperator(kube, tmp_path / "a.log", ns, "replica-a")
    b = PeeredOperator(kube, tmp_path / "b.log", ns, "replica-b")
    try:
        a.start()
        time.sleep(1.5)  # priorities have one-second resolution: a is strictly older
        b.start()
        wait_for(
            "both replicas in the peering object", lambda: _peers(kube, ns) >= {"replica-a", "replica-b"}
        )

        create_job(kube, ns, "before", nodes=3)
        wait_for("job 'before' Running", lambda: phase(kube, ns, "before") == "Running", timeout=60)
        pods = gang_uids(kube, ns, "before")
        assert len(pods) == 3
        assert "before" in a.log() and "before" not in b.log(), "the standby reconciled while a was active"

        a.kill()
        killed = time.monotonic()
        wait_for("b resumes", lambda: "Resuming operations" in b.log(), timeout=LIFETIME + 15)
        took = time.monotonic() - killed
        assert took <= LIFETIME + 5, f"takeover took {took:.1f}s with a {LIFETIME}s peering lifetime"

        create_job(kube, ns, "after", nodes=2)
        wait_for("job 'after' Running under b", lambda: phase(kube, ns, "after") == "Running", timeout=60)
        time.sleep(3)  # a few reconcile passes of b over the adopted job
        assert gang_uids(kube, ns, "before") == pods, "the new active replica replaced or duplicated pods"
        assert phase(kube, ns, "before") == "Running"
        assert len(gang_uids(kube, ns, "after")) == 2
        assert "replica-a" not in _peers(kube, ns), "the dead replica was not cleaned from the peering"
    finally:
        a.kill()
        b.stop()
        kube.delete_namespace(ns)
    if os.environ.get("AIDC_SHOW_LOGS"):
        print(a.log()[-3000:], b.log()[-3000:])


def _peers(kube: Kube, ns: str) -> set[str]:
    obj = kube.custom.get_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", PEERING)
    return set((obj.get("status") or {}).keys())
