"""The development kubelet's per-pod port space (hack/cluster/podnet.py), on gangs the operator's own
builder renders: every pod of a job names one host port for its master's rendezvous port, and two jobs
on the default 29500 get two different ones."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

import podnet
from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import Owner

CMD = ["python", "-m", "aidc_trainer"]


def gang(name: str, nodes: int = 2, **spec: Any) -> list[dict[str, Any]]:
    owner = Owner("TrainingJob", name, "team-a", f"uid-{name}", {})
    pods = build.gang(owner, TrainingJobSpec(command=CMD, nodes=nodes, **spec), attempt=0)
    for rank, p in enumerate(pods):
        p["metadata"]["uid"] = f"{name}-pod-{rank}"
        p["status"] = {"phase": "Running", "podIP": f"10.9.{len(name)}.{rank + 1}"}
    return pods


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["value"] for v in pod["spec"]["containers"][0]["env"] if "value" in v}


def rewrite(pod: dict[str, Any], pods: list[dict[str, Any]], ports: podnet.HostPorts) -> dict[str, str]:
    def host_port(target: dict[str, Any], port: int) -> int:
        return ports.get(target["metadata"]["namespace"], target["metadata"]["uid"], port)

    return podnet.rewrite_env(env_of(pod), pods, lambda p: p["status"]["podIP"], host_port)


def test_each_job_gets_its_own_rendezvous_port_shared_by_all_its_pods(tmp_path: Path) -> None:
    a, b = gang("a"), gang("bb")
    ports = podnet.HostPorts(tmp_path / "ports")
    envs = {p["metadata"]["name"]: rewrite(p, a + b, ports) for p in a + b}
    ea0, ea1, eb0, eb1 = (envs[f"{j}-a0-{r}"] for j in ("a", "bb") for r in (0, 1))
    assert env_of(a[0])["MASTER_PORT"] == env_of(b[0])["MASTER_PORT"] == "29500"  # what users get
    # rank 0 binds what rank 1 connects to; the other job's pair uses another port
    assert ea0["MASTER_PORT"] == ea1["MASTER_PORT"] == ea0["PET_MASTER_PORT"] != "29500"
    assert eb0["MASTER_PORT"] == eb1["MASTER_PORT"] == eb0["PET_MASTER_PORT"] != ea0["MASTER_PORT"]
    assert ea1["MASTER_ADDR"] == ea1["PET_MASTER_ADDR"] == "10.9.1.1"
    assert eb1["MASTER_ADDR"] == "10.9.2.1"
    # a port nobody reaches through a DNS name stays as declared
    assert ea0["AIDC_METRICS_PORT"] == env_of(a[0])["AIDC_METRICS_PORT"]


def test_the_rendezvous_endpoint_of_an_elastic_job_is_translated(tmp_path: Path) -> None:
    pods = gang("el", nodes=2, elastic={"minNodes": 1, "maxNodes": 2})
    ports = podnet.HostPorts(tmp_path / "ports")
    env = rewrite(pods[1], pods, ports)
    host = ports.get("team-a", "el-pod-0", 29500)
    assert env["PET_RDZV_ENDPOINT"] == f"10.9.2.1:{host}"
    assert env["MASTER_PORT"] == str(host)


def test_only_declared_ports_of_live_pods_are_translated() -> None:
    pods = gang("a")
    master = "a-0.a-ranks.team-a.svc"

    def rw(env: dict[str, str], pods: list[dict[str, Any]]) -> dict[str, str]:
        return podnet.rewrite_env(env, pods, lambda p: p["status"]["podIP"], lambda p, port: 4242)

    assert rw({"X_ADDR": master, "X_PORT": "8080"}, pods) == {"X_ADDR": "10.9.1.1", "X_PORT": "8080"}
    assert rw({"E": f"{master}:29500", "F": f"{master}:80"}, pods) == {
        "E": "10.9.1.1:4242",
        "F": "10.9.1.1:80",
    }
    assert rw({"X_HOST": master, "X_PORT": "29500"}, pods)["X_PORT"] == "4242"
    # an unknown name, or a pod that is terminating, resolves to nothing here (as its DNS would)
    other = {"X_ADDR": "z-0.z-ranks.team-a.svc", "X_PORT": "29500"}
    assert rw(other, pods) == other
    pods[0]["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert rw({"X_ADDR": master, "X_PORT": "29500"}, pods) == {"X_ADDR": master, "X_PORT": "29500"}


def test_host_ports_are_stable_exclusive_and_released(tmp_path: Path) -> None:
    one, two = podnet.HostPorts(tmp_path, 30000, 30004), podnet.HostPorts(tmp_path, 30000, 30004)
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        only_busy = podnet.HostPorts(tmp_path / "busy", taken, taken + 1)
        with pytest.raises(RuntimeError, match="no free host port"):  # nor is one something listens on
            only_busy.get("ns", "u", 1)
    p = one.get("ns", "u1", 29500)
    assert one.get("ns", "u1", 29500) == p == two.get("ns", "u1", 29500)  # another kubelet, a restart
    q = two.get("ns", "u2", 29500)
    assert q != p and 30000 <= q < 30004
    assert one.release(lambda ns, uid: uid == "u1") == [p]
    assert one.owners() == {q: "ns/u2/29500"}
    for i in range(3):
        one.get("ns", f"more-{i}", 1)
    with pytest.raises(RuntimeError, match="no free host port"):
        one.get("ns", "one-too-many", 1)
