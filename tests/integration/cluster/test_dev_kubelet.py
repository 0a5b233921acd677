"""The development kubelet on the local control plane, with real processes: a node's power cut kills its
pods' whole process trees and addresses at once and nobody reports or restarts them; deleting a pod
leaves none of its processes behind; a container's termination message reaches its pod's status."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import proctree
import pytest
from kubernetes import client

from tests.kube import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
PODTREE = Path(__file__).with_name("podtree.py")
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
