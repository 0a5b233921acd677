"""The development kubelet on the local control plane, with real processes: a node's power cut kills its
pods' whole process trees and addresses at once and nobody reports or restarts them; deleting a pod
leaves none of its processes behind; a container's termination message reaches its pod's status; no
Secret file outlives its pod; jobs on the same master port each get a port space of their own."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

import proctree
from tests.e2e.helpers import status
from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
PODTREE = Path(__file__).with_name("podtree.py")
BARRIER_TRAINER = Path(__file__).with_name("barrier_trainer.py")
ROOT = Path(__file__).resolve().parents[3]
ROLES = ("main", "child", "grandchild")


def pod(name: str, command: list[str], node: str | None = None, **container: Any) -> dict[str, Any]:
    """A bare pod the development kubelet runs (it runs pods carrying an aidc label)."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "local", "command": command, **container}],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"aidc.dev/job-name": name}},
        "spec": spec,
    }


def pids(pod_dir: Path) -> dict[str, int]:
    return {r: int((pod_dir / f"{r}.pid").read_text()) for r in ROLES if (pod_dir / f"{r}.pid").exists()}


def counter(pod_dir: Path) -> int:
    return int((pod_dir / "counter").read_text() or 0)


def on_lo(address: str) -> bool:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True
    ).stdout
    return f" {address}/32 " in out


def start_tree(kube: Kube, namespace: str, pods_dir: Path, name: str) -> Path:
    kube.core.create_namespaced_pod(namespace, pod(name, ["python", str(PODTREE)]))
    pod_dir = pods_dir / name
    # Budgets, not goals: three Python start-ups on a loaded 2-core machine.
    wait_for(f"{name}'s process tree", lambda: len(pids(pod_dir)) == 3, timeout=180, interval=0.5)
    wait_for(f"{name}'s grandchild counting", lambda: counter(pod_dir) > 0, timeout=60)
    return pod_dir


def test_power_cut_kills_the_pods_of_the_node_and_nobody_reports_or_restarts_them(
    kube: Kube, namespace: str, dev_kubelet: Path
) -> None:
    pod_dir = start_tree(kube, namespace, dev_kubelet, "tree")
    before = kube.core.read_namespaced_pod("tree", namespace)
    node, address = before.spec.node_name, (pod_dir / "address").read_text()
    pod_ip = address == before.status.pod_ip  # else the kubelet lacks CAP_NET_ADMIN: no address on lo
    if pod_ip:
        assert on_lo(address)
    procs = pids(pod_dir)

    kube.fail_node(node)
    try:
        # When fail_node returns: torchrun-like main, its child and the grandchild in a session of its
        # own are all dead (a zombie at most), and the pod's address is gone.
        assert {r: proctree.alive(p) for r, p in procs.items()} == dict.fromkeys(ROLES, False)
        if pod_ip:
            assert not on_lo(address)
        count = counter(pod_dir)
        log = kube.local.logfile(f"kubelet-{namespace}")
        wait_for("the kubelet to let the pod go", lambda: f"{namespace}/tree is gone" in log.read_text(), 60)
    finally:
        kube.restore_node(node)

    # A pod started on the node after it came back proves the kubelet synced since: the first pod was
    # not restarted, and nothing was reported for it.
    kube.core.create_namespaced_pod(
        namespace, pod("after", ["python", "-c", "import time; time.sleep(600)"], node)
    )
    wait_for(
        "a new pod running on the restored node", lambda: (dev_kubelet / "after" / "address").exists(), 240, 1
    )
    assert (pod_dir / "starts").read_text().count("started") == 1
    assert counter(pod_dir) == count
    status = kube.core.read_namespaced_pod("tree", namespace).status
    assert status.phase == "Running", status.phase
    assert not any(c.state and c.state.terminated for c in status.container_statuses or [])


def test_deleting_a_pod_kills_its_whole_process_tree(kube: Kube, namespace: str, dev_kubelet: Path) -> None:
    pod_dir = start_tree(kube, namespace, dev_kubelet, "tree")
    procs = pids(pod_dir)
    kube.core.delete_namespaced_pod("tree", namespace)
    # The grandchild ignores SIGTERM and lives in a session of its own: only a kill of the whole tree
    # (which follows the main process's exit, as a container's processes die with its PID 1) ends it.
    wait_for(
        "every process of the deleted pod gone",
        lambda: not any(proctree.alive(p) for p in procs.values()),
        timeout=120,
        interval=0.5,
    )


def test_termination_message_from_the_file_else_the_log_tail_on_error(
    kube: Kube, namespace: str, dev_kubelet: Path
) -> None:
    report = json.dumps({"exitCode": 6, "cause": "CheckpointSaveFailed", "rank": 0})
    write_and_exit = (
        "import os, sys\n"
        "with open(os.environ['AIDC_TERMINATION_LOG'], 'a') as f:\n"
        "    f.write(sys.argv[1] + '\\n')\n"
        "print('log noise', flush=True)\n"
        "sys.exit(int(sys.argv[2]))\n"
    )
    fail_loudly = "import sys; print('boom: the log tail', file=sys.stderr); sys.exit(3)"
    term_env = [{"name": "AIDC_TERMINATION_LOG", "value": "/dev/termination-log"}]
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    for body in (
        pod("by-file", ["python", "-c", write_and_exit, report, "6"], env=term_env, **fallback),
        pod(
            "own-path",
            ["python", "-c", write_and_exit, "all done", "0"],
            env=[{"name": "AIDC_TERMINATION_LOG", "value": "/var/run/msg"}],
            terminationMessagePath="/var/run/msg",
        ),
        pod("by-logs", ["python", "-c", fail_loudly], **fallback),
        pod("file-policy", ["python", "-c", fail_loudly]),
    ):
        kube.core.create_namespaced_pod(namespace, body)

    def terminated(name: str) -> client.V1ContainerStateTerminated | None:
        st = kube.core.read_namespaced_pod(name, namespace).status
        if st.phase not in ("Succeeded", "Failed"):
            return None
        return st.container_statuses[0].state.terminated

    got = {
        name: wait_for(f"{name} terminated", lambda name=name: terminated(name), timeout=180, interval=0.5)
        for name in ("by-file", "own-path", "by-logs", "file-policy")
    }
    assert (got["by-file"].exit_code, got["by-file"].reason) == (6, "Error")
    assert got["by-file"].message == report + "\n"  # the file, not the log, although the exit failed
    assert (got["own-path"].exit_code, got["own-path"].reason, got["own-path"].message) == (
        0,
        "Completed",
        "all done\n",
    )
    assert got["by-logs"].exit_code == 3 and "boom: the log tail" in got["by-logs"].message
    assert got["file-policy"].exit_code == 3 and not got["file-policy"].message  # policy File: the file only


# key files ------------------------------------------------------------------------------------------
def keyed_pod(name: str, command: list[str]) -> dict[str, Any]:
    """A pod with the Secret `key` as a volume (as a job's checkpoint key is) and in its environment."""
    body = pod(
        name,
        command,
        env=[
            {"name": "KEY_FILE", "value": "/keys/key"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "key", "key": "key"}}},
        ],
        volumeMounts=[{"name": "key", "mountPath": "/keys", "readOnly": True}],
    )
    body["spec"]["volumes"] = [{"name": "key", "secret": {"secretName": "key"}}]
    return body


def create_key(kube: Kube, namespace: str) -> bytes:
    key = secrets.token_hex(16).encode()
    kube.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "key"}, "stringData": {"key": key.decode()}}
    )
    return key


def holding(root: Path, key: bytes) -> list[Path]:
    """The files under root that hold the key."""
    out = []
    for f in root.rglob("*"):
        try:
            if f.is_file() and key in f.read_bytes():
                out.append(f)
        except OSError:  # removed meanwhile
            continue
    return out


def tokens(pod_dir: Path) -> bool:
    return (pod_dir / "serviceaccount" / "token").exists()


def test_no_key_file_outlives_its_pod(kube: Kube, namespace: str, dev_kubelet: Path) -> None:
    key = create_key(kube, namespace)
    sleep = ["python", "-c", "import time; time.sleep(600)"]
    check_key = [
        "python",
        "-c",
        "import os, sys; sys.exit(0 if os.path.isfile(os.environ['KEY_FILE']) else 9)",
    ]
    kube.core.create_namespaced_pod(namespace, keyed_pod("keyed", sleep))
    kube.core.create_namespaced_pod(namespace, keyed_pod("done", check_key))
    wait_for("the key in keyed's volume", lambda: holding(dev_kubelet / "keyed", key), timeout=180)
    # A pod that exited keeps its object (and log) but, as a kubelet tears down a terminated pod's
    # volumes, not its key; it really had the key file while it ran (exit 0).
    wait_for(
        "done to succeed",
        lambda: kube.core.read_namespaced_pod("done", namespace).status.phase == "Succeeded",
        timeout=180,
    )
    wait_for("done's key gone", lambda: not holding(dev_kubelet / "done", key), timeout=60)
    assert not tokens(dev_kubelet / "done") and (dev_kubelet / "done" / "log").exists()

    kube.core.delete_namespaced_pod("keyed", namespace)
    kube.core.delete_namespaced_secret("key", namespace)
    wait_for("no file holding the key", lambda: not holding(dev_kubelet, key), timeout=120)
    assert not tokens(dev_kubelet / "keyed")


class KubeletProcess:
    """local_kubelet.py for one namespace, as the dev_kubelet fixture starts it, to stop and restart."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        assert kube.local is not None
        self.state = kube.local.state_dir
        log = (self.state / "logs" / f"kubelet-{namespace}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "hack" / "cluster" / "local_kubelet.py"),
                "--state-dir",
                str(self.state),
                "--namespace",
                namespace,
            ],
            env={**kube.env(), "PYTHONPATH": f"{ROOT / 'hack' / 'cluster'}:{ROOT / 'operator'}"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def crash(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def kubelets(kube: Kube) -> Iterator[list[KubeletProcess]]:
    if kube.local is None:
        pytest.skip("needs the project's local cluster")
    started: list[KubeletProcess] = []
    yield started
    for k in started:
        k.stop()


def test_a_restarted_kubelet_removes_what_a_crashed_one_left_of_deleted_pods(
    kube: Kube, namespace: str, kubelets: list[KubeletProcess]
) -> None:
    key = create_key(kube, namespace)
    kubelets.append(KubeletProcess(kube, namespace))
    pods_dir = kubelets[0].state / "pods" / namespace
    kube.core.create_namespaced_pod(namespace, keyed_pod("tree", ["python", str(PODTREE)]))
    wait_for("tree's process tree", lambda: len(pids(pods_dir / "tree")) == 3, timeout=180, interval=0.5)
    assert holding(pods_dir / "tree", key)
    uid = (pods_dir / "tree" / "uid").read_text()
    procs = pids(pods_dir / "tree")
    try:
        kubelets[0].crash()  # nobody stops the pod's processes nor removes its files
        kube.core.delete_namespaced_pod("tree", namespace, grace_period_seconds=0)
        wait_for("the pod gone", lambda: not kube.pods(namespace), timeout=60)
        assert holding(pods_dir, key) and any(proctree.alive(p) for p in procs.values())

        kubelets.append(KubeletProcess(kube, namespace))
        wait_for("no file holding the key", lambda: not holding(pods_dir, key), timeout=120)
        wait_for("the gone pod's processes killed", lambda: not any(map(proctree.alive, procs.values())), 60)
    finally:
        proctree.send(proctree.find({proctree.POD: uid}), 9)  # whatever of it a failed test left running


# per-pod ports --------------------------------------------------------------------------------------
def test_jobs_on_the_default_master_port_all_run_at_once(
    kube: Kube, namespace: str, dev_kubelet: Path, operator: Any
) -> None:
    """Two single-node and two 2-node jobs, all on masterPort 29500, their rendezvous stores all bound at
    once (their workers wait for each other before training): every one succeeds."""
    assert kube.local is not None
    barrier = kube.local.state_dir / "barriers" / namespace
    barrier.mkdir(parents=True)
    jobs = {"solo-a": 1, "solo-b": 1, "pair-a": 2, "pair-b": 2}
    command = ["python", str(BARRIER_TRAINER), str(barrier), str(sum(jobs.values()))]
    command += ["--example", "mlp", "--steps", "10", "--eval-every", "0"]
    for name, nodes in jobs.items():
        spec = {"command": command, "nodes": nodes, "procPerNode": 1, "gpusPerNode": 0}
        kube.create_cr("TrainingJob", namespace, name, spec)

    def phases() -> dict[str, str | None]:
        return {name: status(kube, namespace, name).get("phase") for name in jobs}

    # torch's start-up in 10 processes on a loaded 2-core machine: a budget, not a goal (inside
    # pytest's 600 s per test, so a miss says what it waited for)
    wait_for(
        "every job to finish",
        lambda: all(p in ("Succeeded", "Failed") for p in phases().values()),
        timeout=560,
        interval=2,
    )
    assert phases() == dict.fromkeys(jobs, "Succeeded"), {n: status(kube, namespace, n) for n in jobs}
    assert {p.name for p in barrier.iterdir()} == {f"{n}-a0-{r}" for n, k in jobs.items() for r in range(k)}
