"""What an aggregated API server (metrics-server, prometheus-adapter) needs to run as a plain process of
the local cluster instead of as a Deployment behind a Service:

* an address of this cluster's pod network put on lo, that no pod or probe gets ({pod_net}.255.<octet>),
  named by a selectorless Service with hand-made Endpoints (the apiserver runs with
  --enable-aggregator-routing, so it dials that endpoint rather than the Service's unroutable ClusterIP);
* a serving certificate from the cluster CA for the Service's names and that address (the APIService then
  carries our CA as caBundle instead of insecureSkipTLSVerify), and a client certificate whose CN is the
  upstream ServiceAccount's user name, so that upstream's RBAC applies unchanged;
* a wait for the APIService to be Available."""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cluster_pki import issue_cert, issue_client_cert, kubeconfig, load_ca, new_key, pem_key, x509_name
from cluster_processes import ClusterError
from pod_addresses import add_loopback_address, pod_address_label

if TYPE_CHECKING:
    from localcluster import LocalCluster


def check_aggregation(c: LocalCluster) -> None:
    """Raises unless this cluster's apiserver runs with the aggregation flags."""
    apiserver = c.procs.alive("kube-apiserver")
    if apiserver is None:
        raise ClusterError(f"no kube-apiserver runs for {c.state_dir}: start the cluster first")
    if b"--enable-aggregator-routing=true" not in Path(f"/proc/{apiserver}/cmdline").read_bytes():
        raise ClusterError(
            "this cluster's kube-apiserver was started without the aggregation flags (an older"
            " checkout started it): `python hack/cluster/localcluster.py down` and start it again"
        )


def listen_address(c: LocalCluster, octet: int, who: str) -> str:
    """{pod_net}.255.OCTET, put on lo (idempotent)."""
    addr = f"{c.pod_net}.255.{octet}"
    if why := add_loopback_address(addr, pod_address_label(c.pod_net)):
        raise ClusterError(f"cannot put {addr} on lo for {who} (needs CAP_NET_ADMIN): {why}")
    return addr


def write_certs(c: LocalCluster, component: str, namespace: str, user: str, addr: str) -> str:
    """COMPONENT's serving cert (pki/COMPONENT/tls.*) and client identity USER (pki/COMPONENT.*, and
    COMPONENT.kubeconfig in the state dir), from the cluster CA; returns the CA as a caBundle."""
    ca, ca_key = load_ca(c.pki)
    sans: list[x509.GeneralName] = [
        x509.DNSName(f"{component}.{namespace}.svc"),
        x509.DNSName(f"{component}.{namespace}.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address(addr)),
    ]
    d = c.pki / component
    d.mkdir(parents=True, exist_ok=True)
    key = new_key()
    cert = issue_cert(x509_name(component), key, ca.subject, ca_key, server=True, sans=sans)
    (d / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "tls.key").write_bytes(pem_key(key))
    client_identity(c, component, user)
    return base64.b64encode(ca.public_bytes(serialization.Encoding.PEM)).decode()


def client_identity(c: LocalCluster, name: str, user: str) -> Path:
    """A client certificate for USER (group system:serviceaccounts) and a kubeconfig using it."""
    issue_client_cert(c.pki, name, x509_name(user, "system:serviceaccounts"))
    path = c.state_dir / f"{name}.kubeconfig"
    path.write_text(kubeconfig(c.server, c.pki, name))
    return path


def server_flags(c: LocalCluster, component: str, addr: str, port: int) -> list[str]:
    """The k8s.io/apiserver flags every aggregated server here shares: where it listens, its serving
    certificate, and its client identity for delegated authentication and authorisation."""
    kc = c.state_dir / f"{component}.kubeconfig"
    certs = c.pki / component
    return [
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        f"--bind-address={addr}",
        f"--secure-port={port}",
        f"--tls-cert-file={certs / 'tls.crt'}",
        f"--tls-private-key-file={certs / 'tls.key'}",
        f"--cert-dir={certs}",
    ]


def service_and_endpoints(name: str, namespace: str, addr: str, port: int) -> list[dict[str, Any]]:
    """A selectorless Service NAME whose Endpoints are ADDR:PORT."""
    meta = {"name": name, "namespace": namespace, "labels": {"k8s-app": name}}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port, "protocol": "TCP"}]},
    }
    endpoints = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": meta,
        "subsets": [{"addresses": [{"ip": addr}], "ports": [{"name": "https", "port": port}]}],
    }
    return [service, endpoints]


def apply(c: LocalCluster, docs: list[dict[str, Any]]) -> None:
    items = {"apiVersion": "v1", "kind": "List", "items": docs}
    args = ("apply", "--server-side", "--force-conflicts", "--field-manager=aidc-localcluster", "-f", "-")
    c.kubectl(*args, input=json.dumps(items))


def wait_available(c: LocalCluster, api_services: list[str], component: str, timeout: float = 120) -> None:
    def available() -> bool:
        for name in api_services:
            svc = json.loads(c.kubectl("get", "apiservice", name, "-o", "json"))
            conds = svc.get("status", {}).get("conditions", [])
            if not any(x["type"] == "Available" and x["status"] == "True" for x in conds):
                return False
        return True

    c._wait(f"APIService {', '.join(api_services)} Available", available, timeout, component, interval=1)
