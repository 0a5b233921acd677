"""The local cluster's fake GPU nodes (hack/cluster/kwok_nodes.py) and their pod address ranges
(hack/cluster/pod_addresses.py): what Kueue's flavors and the development kubelet rely on."""

from __future__ import annotations

import ipaddress
from collections import Counter

from kwok_nodes import GPU_POOL_LABEL, GPU_POOLS, KWOK_ANNOTATION, fleet_node_manifest, node_manifest
from pod_addresses import fleet_pod_cidr, node_pod_cidr

ZONE = "topology.kubernetes.io/zone"


def test_every_zone_holds_both_gpu_pools_in_equal_parts() -> None:
    labels = [node_manifest(i, gpus_per_node=8)["metadata"]["labels"] for i in range(8)]
    assert Counter((lb[ZONE], lb[GPU_POOL_LABEL]) for lb in labels) == {
        ("zone-a", "h100"): 2,
        ("zone-b", "h100"): 2,
        ("zone-a", "a100"): 2,
        ("zone-b", "a100"): 2,
    }
    for lb in labels:
        assert lb["nvidia.com/gpu.product"] == GPU_POOLS[lb[GPU_POOL_LABEL]]
        assert lb["nvidia.com/gpu.count"] == "8"


def test_each_kind_of_node_is_managed_by_its_own_kwok_and_has_an_address_of_its_own() -> None:
    nodes = [node_manifest(i, 8) for i in range(300)]
    fleet = [fleet_node_manifest(i, 8) for i in range(1000)]
    assert {n["metadata"]["annotations"][KWOK_ANNOTATION] for n in nodes} == {"fake"}
    assert {n["metadata"]["annotations"][KWOK_ANNOTATION] for n in fleet} == {"fleet"}
    addresses = [n["status"]["addresses"][0]["address"] for n in nodes + fleet]
    assert len(set(addresses)) == len(addresses)
    assert nodes[0]["status"]["allocatable"]["nvidia.com/gpu"] == "8"


def test_fleet_pods_never_get_an_address_of_a_per_node_agent() -> None:
    for pod_net in ("10.64", "10.128", "10.249"):
        fleet = ipaddress.ip_network(fleet_pod_cidr(pod_net), strict=False)
        per_node = {
            ipaddress.ip_network(node_pod_cidr(pod_net, f"gpu-node-{i}"), strict=False) for i in range(250)
        }
        assert len(per_node) == 250  # one /24 per agent
        assert not any(fleet.overlaps(n) for n in per_node)
