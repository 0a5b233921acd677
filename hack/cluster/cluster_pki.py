"""The local cluster's certificates and kubeconfigs: one CA, the apiserver's serving certificate, a client
certificate per component identity (and per extra identity a benchmark asks for), the service-account
key pair, and kubeconfigs that embed them. Everything lives in <state>/pki and goes with `down`."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster_processes import ClusterError

# Identities write_pki issues; issue_identity refuses these names so it never overwrites one.
RESERVED_IDENTITIES = (
    *("ca", "sa", "apiserver", "admin", "controller-manager", "scheduler", "kwok"),
    *("front-proxy-ca", "front-proxy-client"),
)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = [x509.ExtendedKeyUsageOID.SERVER_AUTH] if server else [x509.ExtendedKeyUsageOID.CLIENT_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def x509_name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def write_pki(pki: Path) -> None:
    """CA, apiserver serving cert, one client cert per component identity, service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = new_key()
    ca_name = x509_name("aidc-local-ca")
    ca = issue_cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(pem_key(ca_key))

    sans: list[x509.GeneralName] = [
        x509.DNSName(n)
        for n in (
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
    ]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.96.0.1")]
    identities = {
        "apiserver": (x509_name("kube-apiserver"), True),
        "admin": (x509_name("aidc-admin", "system:masters"), False),
        "controller-manager": (x509_name("system:kube-controller-manager"), False),
        "scheduler": (x509_name("system:kube-scheduler"), False),
        # kwok plays the nodes' kubelets; the Node authorizer is off, so it acts as a cluster admin.
        "kwok": (x509_name("kwok", "system:masters"), False),
    }
    for ident, (subject, server) in identities.items():
        key = new_key()
        cert = issue_cert(subject, key, ca_name, ca_key, server=server, sans=sans if server else None)
        (pki / f"{ident}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (pki / f"{ident}.key").write_bytes(pem_key(key))
    sa = new_key()
    (pki / "sa.key").write_bytes(pem_key(sa))
    sa_pub = sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (pki / "sa.pub").write_bytes(sa_pub)
    write_front_proxy(pki)


def write_front_proxy(pki: Path) -> None:
    """The aggregation layer's own CA and the client cert the apiserver presents when it proxies to an
    extension apiserver (metrics-server): a CA of its own, as kubeadm does, so no other client cert of
    the cluster can assert X-Remote-User to an extension apiserver."""
    key = new_key()
    name = x509_name("aidc-front-proxy-ca")
    ca = issue_cert(name, key, name, key, ca=True)
    (pki / "front-proxy-ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    client_key = new_key()
    cert = issue_cert(x509_name("front-proxy-client"), client_key, name, key)
    (pki / "front-proxy-client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / "front-proxy-client.key").write_bytes(pem_key(client_key))


def load_ca(pki: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The cluster CA write_pki made: its certificate and key, to sign more certificates with."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes()), ca_key


def issue_client_cert(pki: Path, name: str, subject: x509.Name) -> None:
    """<pki>/NAME.crt and .key: a client certificate for SUBJECT signed by the cluster CA."""
    ca, ca_key = load_ca(pki)
    key = new_key()
    cert = issue_cert(subject, key, ca.subject, ca_key)
    (pki / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / f"{name}.key").write_bytes(pem_key(key))


def issue_identity(pki: Path, user: str) -> None:
    """<pki>/USER.crt and .key: a client certificate CN=USER, O=system:masters signed by the cluster CA."""
    if user in RESERVED_IDENTITIES or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9:._-]*", user):
        raise ClusterError(f"{user!r} cannot be an identity name (reserved, or not [A-Za-z0-9:._-]+)")
    issue_client_cert(pki, user, x509_name(user, "system:masters"))


def kubeconfig(server: str, pki: Path, ident: str) -> str:
    """A kubeconfig for SERVER as IDENT, its CA and client certificate embedded (pki/IDENT.crt, .key)."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "aidc-local",
                    "cluster": {"server": server, "certificate-authority-data": b64(pki / "ca.crt")},
                }
            ],
            "users": [
                {
                    "name": ident,
                    "user": {
                        "client-certificate-data": b64(pki / f"{ident}.crt"),
                        "client-key-data": b64(pki / f"{ident}.key"),
                    },
                }
            ],
            "contexts": [{"name": "aidc-local", "context": {"cluster": "aidc-local", "user": ident}}],
            "current-context": "aidc-local",
        },
        indent=1,
    )
