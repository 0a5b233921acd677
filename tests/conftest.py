"""Session fixtures: one real control plane per test session (or the cluster KUBECONFIG names), a
namespace per test, the CRDs installed, and an operator process watching test namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from cluster_processes import free_port
from tests.kube import Kube, start_cluster, wait_for

ROOT = Path(__file__).resolve().parent.parent

# CI replays the same generated examples every run (a red build always means a code change); local
# runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    state = ROOT / ".state" / f"test-cluster-{os.getpid()}"
    k = start_cluster(state)
    try:
        yield k
    finally:
        if k.local is not None and not os.environ.get("AIDC_KEEP_CLUSTER"):
            k.local.down()
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def crds(kube: Kube) -> Kube:
    """The aidc CRDs applied and Established."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kube.wait_crds("trainingjobs.aidc.dev", "inferenceservices.aidc.dev")
    return kube


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (t-<test>-<random>) deleted after the test; failed nodes are restored first."""
    kube.ensure_all_nodes_ready()
    ns = kube.create_namespace(request.node.name)
    yield ns
    kube.delete_namespace(ns)


class OperatorProcess:
    """`python -m aidc_operator` as a real subprocess against the test cluster; its log is kept so tests
    can read (and grep) everything it wrote."""

    def __init__(self, kube: Kube, log_path: Path, namespaces: list[str], extra: list[str] | None = None):
        self.kube, self.log_path, self.namespaces, self.extra = kube, log_path, namespaces, extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        self.health_port = free_port()
        args = [
            sys.executable,
            "-m",
            "aidc_operator",
            "--standalone",
            "--metrics-port",
            "0",
            "--health-port",
            str(self.health_port),
            *self.extra,
        ]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        env = {**self.kube.env(), "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator",))}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for("operator liveness endpoint", self._healthy, timeout=60)
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise pytest.fail(f"operator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
            return r.status == 200

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node running the operator dies."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def operator(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator for the session, serving every test namespace (t-*)."""
    op = OperatorProcess(crds, tmp_path_factory.mktemp("operator") / "operator.log", ["t-*"]).start()
    yield op
    op.stop()


@pytest.fixture
def dev_kubelet(kube: Kube, namespace: str) -> Iterator[Path]:
    """The development kubelet (hack/cluster/local_kubelet.py) for this test's namespace: runs its
    aidc-labelled pods as local processes; yields the directory of their pod dirs."""
    if kube.local is None:
        pytest.skip("needs the project's local cluster")
    state = kube.local.state_dir
    log = (state / "logs").joinpath(f"kubelet-{namespace}.log").open("ab")
    kubelet = str(ROOT / "hack" / "cluster" / "local_kubelet.py")
    proc = subprocess.Popen(
        [sys.executable, kubelet, "--state-dir", str(state), "--namespace", namespace],
        env={**kube.env(), "PYTHONPATH": f"{ROOT / 'hack' / 'cluster'}:{ROOT / 'operator'}"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield state / "pods" / namespace
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
