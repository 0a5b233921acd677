"""The command lines of the local cluster's components (etcd, kube-apiserver and its audit policy,
kube-controller-manager, kube-scheduler, the kwok agents), built from a LocalCluster's recorded ports
and paths. Pure: nothing here starts, reads or writes anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from kwok_nodes import KWOK_ANNOTATION
from pod_addresses import node_pod_cidr

if TYPE_CHECKING:
    from localcluster import LocalCluster

AUDIT_POLICY = Path(__file__).resolve().parent / "audit-policy.yaml"  # the apiserver's (docs/security.md)


def etcd(c: LocalCluster) -> list[str]:
    p = c.ports
    return [
        "--name=aidc",
        f"--data-dir={c.state_dir / 'etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
        f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
        f"--listen-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
        f"--initial-cluster=aidc=http://127.0.0.1:{p['etcd_peer']}",
        "--unsafe-no-fsync",  # a throwaway test store: durability buys nothing, fsync costs seconds
        "--log-level=warn",
    ]


def apiserver(c: LocalCluster) -> list[str]:
    pki, p = c.pki, c.ports
    return [
        f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
        "--bind-address=127.0.0.1",
        f"--secure-port={p['apiserver']}",
        "--advertise-address=127.0.0.1",
        f"--cert-dir={c.state_dir / 'apiserver'}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        # The default admission chain (ServiceAccount, DefaultTolerationSeconds, PodSecurity, quota,
        # webhooks ...) stays on: tests see what a real cluster does.
        "--endpoint-reconciler-type=none",  # the 'kubernetes' Endpoints cannot point at loopback
        "--profiling=false",
        "--v=1",
        *audit_flags(c),
        *aggregation_flags(c),
    ]


def aggregation_flags(c: LocalCluster) -> list[str]:
    """The aggregation layer (APIServices such as metrics-server's v1beta1.metrics.k8s.io): the front
    proxy's client cert and CA, and routing to an APIService's endpoint address rather than its
    Service's ClusterIP, which nothing routes on this machine."""
    pki = c.pki
    return [
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        "--enable-aggregator-routing=true",
    ]


def audit_policy(users: tuple[str, ...]) -> str:
    """audit-policy.yaml (writes to TrainingJobs and InferenceServices with their bodies, to Secrets
    metadata only, nothing else), preceded for USERS (a benchmark's operators) by a rule logging every
    request of theirs at Metadata level (no bodies)."""
    policy = AUDIT_POLICY.read_text()
    if users:
        listed = json.dumps(list(users))
        policy = policy.replace("\nrules:\n", f"\nrules:\n  - level: Metadata\n    users: {listed}\n", 1)
    return policy


def audit_flags(c: LocalCluster) -> list[str]:
    # Blocking: an event is on disk when the request's response is; the policy keeps them few.
    return [
        f"--audit-policy-file={c.audit_policy}",
        f"--audit-log-path={c.audit_log}",
        "--audit-log-format=json",
        "--audit-log-mode=blocking",
        # lumberjack rotates at 100 MB when maxsize is 0: make rotation practically never happen.
        "--audit-log-maxsize=1000000",
        "--audit-log-maxbackup=0",
        "--audit-log-maxage=0",
    ]


def controller_manager(c: LocalCluster) -> list[str]:
    pki, sd = c.pki, c.state_dir
    return [
        f"--kubeconfig={sd / 'controller-manager.kubeconfig'}",
        f"--authentication-kubeconfig={sd / 'controller-manager.kubeconfig'}",
        f"--authorization-kubeconfig={sd / 'controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1",
        f"--secure-port={c.ports['controller_manager']}",
        f"--cert-dir={sd / 'controller-manager'}",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        # Node lifecycle: how long a silent node stays Ready. Short here so failure tests are quick.
        f"--node-monitor-grace-period={c.node_monitor_grace_period}",
        "--node-monitor-period=2s",
        "--horizontal-pod-autoscaler-sync-period=5s",  # default 15 s: tests see HPA status sooner
        # default 5 min: the autoscaling test sees a scale-down within a minute of the load stopping
        "--horizontal-pod-autoscaler-downscale-stabilization=20s",
        "--v=1",
    ]


def scheduler(c: LocalCluster) -> list[str]:
    sd = c.state_dir
    return [
        f"--kubeconfig={sd / 'scheduler.kubeconfig'}",
        f"--authentication-kubeconfig={sd / 'scheduler.kubeconfig'}",
        f"--authorization-kubeconfig={sd / 'scheduler.kubeconfig'}",
        "--bind-address=127.0.0.1",
        f"--secure-port={c.ports['scheduler']}",
        "--leader-elect=false",
        "--v=1",
    ]


def kwok_node_agent(c: LocalCluster, node: str, port: int) -> list[str]:
    """kwok managing NODE alone, standing in for its kubelet (10 s Leases: a lost node shows soon)."""
    assert c.bin_dir is not None
    return [
        f"--kubeconfig={c.state_dir / 'kwok.kubeconfig'}",
        f"--config={c.bin_dir / 'kwok-stages.yaml'}",
        f"--manage-single-node={node}",
        "--node-lease-duration-seconds=10",
        f"--cidr={node_pod_cidr(c.pod_net, node)}",
        f"--server-address=127.0.0.1:{port}",
    ]


def kwok_fleet_agent(c: LocalCluster, port: int) -> list[str]:
    """kwok managing every node annotated kwok.x-k8s.io/node=fleet."""
    assert c.bin_dir is not None
    return [
        f"--kubeconfig={c.state_dir / 'kwok.kubeconfig'}",
        f"--config={c.bin_dir / 'kwok-stages.yaml'}",
        f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fleet",
        f"--node-lease-duration-seconds={c.fleet_lease_seconds}",
        f"--cidr={c.fleet_pod_cidr}",
        f"--server-address=127.0.0.1:{port}",
    ]
