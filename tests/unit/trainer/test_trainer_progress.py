"""Progress reporting to the operator: a real HTTPS server stands in for the kube-apiserver."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aidc_trainer.progress import LAST_CHECKPOINT, PROGRESS, ProgressReporter


def _self_signed(d: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    crt, pem = d / "ca.crt", d / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem


def test_rank0_merge_patches_its_own_pod_annotations_with_the_sa_token(tmp_path: Path) -> None:
    crt, pem = _self_signed(tmp_path)
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok-123\n")
    (sa / "ca.crt").write_bytes(crt.read_bytes())
    got: list[dict[str, Any]] = []
    done = threading.Event()

    class Api(http.server.BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")
            if any(LAST_CHECKPOINT in g["body"]["metadata"]["annotations"] for g in got):
                done.set()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, pem)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    env = {
        "AIDC_POD_NAME": "job-worker-0",
        "AIDC_POD_NAMESPACE": "team-a",
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(srv.server_address[1]),
    }
    rep = ProgressReporter(str(tmp_path / "ck"), environ=env, sa_dir=sa)
    try:
        assert rep.in_cluster
        rep.progress(120, 1000)
        rep.checkpoint(100, "/checkpoints/job/step-000000100")
        assert done.wait(10)
    finally:
        rep.close()
        srv.shutdown()
    last = got[-1]
    assert last["path"] == "/api/v1/namespaces/team-a/pods/job-worker-0"
    assert last["headers"]["Authorization"] == "Bearer tok-123"
    assert last["headers"]["Content-Type"] == "application/merge-patch+json"
    ann = last["body"]["metadata"]["annotations"]
    assert json.loads(ann[LAST_CHECKPOINT])["path"] == "/checkpoints/job/step-000000100"
    prog = json.loads(ann[PROGRESS])
    assert prog["step"] == 120 and prog["totalSteps"] == 1000 and prog["time"].endswith("Z")
    assert not (tmp_path / "ck" / "progress.json").exists()  # in a cluster: annotations only


def test_outside_a_cluster_progress_goes_to_a_file(tmp_path: Path) -> None:
    rep = ProgressReporter(str(tmp_path), environ={})
    rep.progress(5, 10)
    rep.checkpoint(5, str(tmp_path / "step-000000005"))
    rep.close()
    data = json.loads((tmp_path / "progress.json").read_text())
    assert data[PROGRESS]["step"] == 5 and data[LAST_CHECKPOINT]["step"] == 5
