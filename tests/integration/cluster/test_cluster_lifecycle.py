"""`make cluster-up/down` semantics: a second cluster beside the first, idempotent up, clean down that
stops only its own processes, and clear errors instead of hangs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from cluster_processes import ClusterError
from localcluster import LocalCluster
from tests.kube import Kube

pytestmark = pytest.mark.cluster


def test_second_cluster_runs_beside_the_first_and_down_stops_only_its_own(kube: Kube, tmp_path: Path) -> None:
    first_before = kube.local.running()
    second = LocalCluster(tmp_path / "second", nodes=1, gpus_per_node=2).up()
    try:
        assert second.healthy()
        assert second.ports["apiserver"] != kube.local.ports["apiserver"]
        assert second.ready_nodes() == 1
        again = LocalCluster(tmp_path / "second", nodes=1, gpus_per_node=2).up()  # idempotent
        assert again.ports == second.ports and again.running() == second.running()
    finally:
        second.down()
    assert not any(second.running().values()), "down left processes behind"
    assert kube.local.running() == first_before, "stopping the second cluster touched the first"
    assert kube.kubectl("get", "nodes").returncode == 0


def test_port_in_use_is_a_clear_error(kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setitem(os.environ, "AIDC_APISERVER_PORT", str(port))
        with pytest.raises(ClusterError, match=f"port {port} .*in use"):
            LocalCluster(tmp_path / "third", nodes=1).up()
