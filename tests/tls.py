"""Test certificates: a CA and a serving certificate for a loopback HTTPS server (the webhook
server the apiserver calls, the model server, a stand-in apiserver), issued with the local
cluster's own certificate helpers."""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cluster_pki import issue_cert, new_key, pem_key, x509_name


@dataclass(frozen=True)
class ServingCert:
    cert_file: Path
    key_file: Path
    ca_file: Path  # what a client trusts
    ca_bundle: str  # base64 PEM, as a webhook configuration's caBundle


def serving_cert(directory: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> ServingCert:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_name = new_key(), x509_name("aidc-test-ca")
    ca = issue_cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    key = new_key()
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = issue_cert(x509_name(ips[0]), key, ca_name, ca_key, server=True, sans=sans)
    cert_file, key_file, ca_file = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(pem_key(key))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    ca_file.write_bytes(ca_pem)
    return ServingCert(cert_file, key_file, ca_file, base64.b64encode(ca_pem).decode())
