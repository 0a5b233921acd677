"""A node death is a power cut: LocalCluster.stop_node_agent kills every process of every pod the
development kubelet runs on the node at once — a grandchild in a session of its own included — with no
graceful exit, and takes the pods' addresses off lo, before it returns. Real processes, no control plane:
the agent is a stand-in process with the pid file `up` would have written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import proctree
from localcluster import LocalCluster
from pod_addresses import pick_pod_net, pod_address_label
from tests.kube import wait_for

pytestmark = pytest.mark.cluster
PODTREE = Path(__file__).with_name("podtree.py")
ROLES = ("main", "child", "grandchild")


class PodTree:
    """podtree.py started as the development kubelet starts a pod: its own session, the pod's markers."""

    def __init__(self, workdir: Path, markers: dict[str, str]) -> None:
        self.dir, self.markers = workdir, markers
        workdir.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(PODTREE)],
            cwd=workdir,
            env={**os.environ, **markers},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for("the pod's process tree", lambda: all((workdir / f"{r}.pid").exists() for r in ROLES))
        wait_for("the grandchild counting", lambda: self.counter() > 0)

    def pids(self) -> dict[str, int]:
        return {r: int((self.dir / f"{r}.pid").read_text()) for r in ROLES}

    def alive(self) -> dict[str, bool]:
        return {r: proctree.alive(p) for r, p in self.pids().items()}

    def counter(self) -> int:
        try:
            return int((self.dir / "counter").read_text() or 0)
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        proctree.send(proctree.find(self.markers), 9)  # what is still alive of it, never a recycled pid
        self.proc.wait(10)


@pytest.fixture
def trees() -> Iterator[list[PodTree]]:
    made: list[PodTree] = []
    yield made
    for t in made:
        t.stop()


def _agent(cluster: LocalCluster, node: str) -> int:
    """A stand-in for the node's kwok agent, recorded as `up` records the real one."""
    return cluster.start_process(f"kwok-{node}", [sys.executable, "-c", "import time; time.sleep(600)"])


def test_power_cut_kills_the_whole_node_at_once_and_nothing_else(
    tmp_path: Path, trees: list[PodTree]
) -> None:
    cluster = LocalCluster(tmp_path / "state", pod_net=pick_pod_net())
    other_cluster = tmp_path / "other-state"  # another local cluster with a gpu-node-0 of its own
    agents = {n: _agent(cluster, n) for n in ("gpu-node-0", "gpu-node-1")}
    victim = [
        PodTree(tmp_path / f"victim-{i}", proctree.markers(cluster.state_dir, "gpu-node-0", f"uid-{i}"))
        for i in range(2)
    ]
    bystanders = [
        PodTree(tmp_path / "other-node", proctree.markers(cluster.state_dir, "gpu-node-1", "uid-2")),
        PodTree(tmp_path / "other-cluster", proctree.markers(other_cluster, "gpu-node-0", "uid-3")),
    ]
    trees += victim + bystanders

    # The kubelet records each pod's node and address in its directory and puts the address on lo.
    address = f"{cluster.pod_net}.0.7"
    pod_dir = cluster.state_dir / "pods" / "ns" / "victim-0"
    pod_dir.mkdir(parents=True)
    (pod_dir / "node").write_text("gpu-node-0")
    (pod_dir / "address").write_text(address)
    add = [
        "ip",
        "-4",
        "addr",
        "add",
        f"{address}/32",
        "dev",
        "lo",
        "label",
        pod_address_label(cluster.pod_net),
    ]
    has_address = subprocess.run(add, capture_output=True).returncode == 0

    try:
        cluster.stop_node_agent("gpu-node-0")
        # Right after the call returns: every process of the node's pods is dead (at most a zombie
        # waiting for its parent), the agent too; nothing else was touched.
        after = {t.dir.name: t.alive() for t in victim}
        count = {t.dir.name: t.counter() for t in victim}
        assert after == {t.dir.name: dict.fromkeys(ROLES, False) for t in victim}
        assert not proctree.alive(agents["gpu-node-0"])
        assert proctree.alive(agents["gpu-node-1"])
        for t in bystanders:
            assert t.alive() == dict.fromkeys(ROLES, True), t.dir.name
        if has_address:
            lo = subprocess.run(
                ["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True
            )
            assert f" {address}/32 " not in lo.stdout
        # The grandchild (own session, SIGTERM ignored) wrote nothing after the cut, while the
        # bystanders' grandchildren kept counting meanwhile.
        marks = {t.dir.name: t.counter() for t in bystanders}
        wait_for(
            "the bystanders counting on", lambda: all(t.counter() > marks[t.dir.name] for t in bystanders)
        )
        assert {t.dir.name: t.counter() for t in victim} == count
    finally:
        cluster.down()
        subprocess.run(["ip", "-4", "addr", "del", f"{address}/32", "dev", "lo"], capture_output=True)


def test_freeze_catches_what_forks_while_it_scans(tmp_path: Path) -> None:
    """A chain of processes still forking cannot outrun the cut: a stopped process cannot fork, and the
    scan repeats until it finds no new one."""
    markers = proctree.markers(tmp_path, "gpu-node-9", "uid-fork")
    chain = (  # each process starts the next in a session of its own, then waits: a chain of 50
        "import os, time\n"
        "for _ in range(50):\n"
        "    time.sleep(0.01)\n"
        "    if os.fork():\n"
        "        break\n"
        "    os.setsid()\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", chain], env={**os.environ, **markers}, start_new_session=True
    )
    try:
        wait_for("a few generations", lambda: len(proctree.find(markers)) >= 5)
        killed = proctree.power_cut(markers)
        assert len(killed) >= 5
        assert not proctree.find(markers)
    finally:
        proctree.send(proctree.find(markers), 9)
        proc.wait(10)
