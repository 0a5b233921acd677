"""The two operators bench/scale.py compares, behind one interface: install, start as its own user, the
job it runs (4 pods x 1 GPU), how its pods are labelled and what request counter it exports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from _scale_measure import prom_counter

from localcluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "aidc-bench/noop:1"  # never pulled: kwok's fake nodes run nothing


class BenchError(RuntimeError):
    """A step of the benchmark failed or timed out; the message says which."""


def wait_until(what: str, fn: Any, timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


class Operator:
    name: str  # "aidc" | "kubeflow"
    user: str  # the identity it runs as: its requests in the audit log are this user's
    group: str
    version: str
    plural: str
    job_label: str  # its pods carry <job_label>=<job name>
    pods_per_job = 4
    counter: tuple[str, tuple[str, ...]]  # its own request counter: metric name, label keys

    def install(self, c: LocalCluster) -> None:
        raise NotImplementedError

    def start(
        self, c: LocalCluster, log: Path, metrics_port: int, health_port: int
    ) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def job(self, name: str, namespace: str, prefer_nodes: list[str] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def requests_counter(self, metrics_port: int) -> dict[str, float] | None:
        return prom_counter(f"http://127.0.0.1:{metrics_port}/metrics", *self.counter)

    @staticmethod
    def reports_running(job: dict[str, Any]) -> bool:
        """Does the job's own status say it runs? (The operator has caught up with its pods.)"""
        status = job.get("status") or {}
        return status.get("phase") == "Running" or any(
            c.get("type") == "Running" and c.get("status") == "True" for c in status.get("conditions") or []
        )


class Aidc(Operator):
    name, user = "aidc", "aidc-operator"
    group, version, plural = "aidc.dev", "v1alpha1", "trainingjobs"
    job_label = "aidc.dev/job-name"
    counter = ("aidc_api_requests_total", ("verb", "resource"))

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def install(self, c: LocalCluster) -> None:
        c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        c.wait_crds("trainingjobs.aidc.dev")

    def start(
        self, c: LocalCluster, log: Path, metrics_port: int, health_port: int
    ) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "KUBECONFIG": str(c.identity_kubeconfig(self.user)),
            "PYTHONPATH": str(ROOT / "operator"),
        }
        argv = [
            sys.executable,
            "-m",
            "aidc_operator",
            "--standalone",
            "--metrics-port",
            str(metrics_port),
            "--health-port",
            str(health_port),
            "--namespace",
            self.namespace,
        ]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
            )

        def healthy() -> bool:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise BenchError(f"aidc operator exited ({proc.returncode}) during start-up:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        try:
            wait_until("the aidc operator's /healthz", healthy, 180, 0.3)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return proc

    def job(self, name: str, namespace: str, prefer_nodes: list[str] | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "image": IMAGE,
            "command": ["python", "-m", "noop"],
            "nodes": 4,
            "procPerNode": 1,  # gpusPerNode defaults to it: 1 GPU per pod
        }
        if prefer_nodes:
            term = {"key": "kubernetes.io/hostname", "operator": "In", "values": prefer_nodes}
            spec["podTemplate"] = {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 100, "preference": {"matchExpressions": [term]}}
                        ]
                    }
                }
            }
        return {
            "apiVersion": f"{self.group}/{self.version}",
            "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }


class Kubeflow(Operator):
    name, user = "kubeflow", "training-operator"
    group, version, plural = "kubeflow.org", "v1", "pytorchjobs"
    counter = ("rest_client_requests_total", ("method",))  # controller-runtime's client-go metric

    def __init__(self) -> None:
        import _kubeflow  # the peer's helper; imported only when Kubeflow runs

        self.kf = _kubeflow
        self.bin_dir: Path | None = None
        selector = dict(kv.split("=", 1) for kv in _kubeflow.pods_selector("probe").split(","))
        self.job_label = next(k for k, v in selector.items() if v == "probe")

    def install(self, c: LocalCluster) -> None:
        self.bin_dir = self.kf.ensure_built()
        self.kf.install_crd(c.kubectl, self.bin_dir)

    def start(
        self, c: LocalCluster, log: Path, metrics_port: int, health_port: int
    ) -> subprocess.Popen[bytes]:
        assert self.bin_dir is not None
        kubeconfig = c.identity_kubeconfig(self.user)
        return self.kf.start(self.bin_dir, kubeconfig, log, metrics_port, health_port, timeout=180)

    def job(self, name: str, namespace: str, prefer_nodes: list[str] | None = None) -> dict[str, Any]:
        return self.kf.pytorchjob(name, namespace, workers=3, gpus=1)


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
