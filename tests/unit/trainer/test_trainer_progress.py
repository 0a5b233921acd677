"""Progress reporting to the operator: a real HTTPS server stands in for the kube-apiserver."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from pathlib import Path
from typing import Any

from aidc_trainer.progress import LAST_CHECKPOINT, PROGRESS, ProgressReporter
from tests.tls import serving_cert


def test_rank0_merge_patches_its_own_pod_annotations_with_the_sa_token(tmp_path: Path) -> None:
    tls = serving_cert(tmp_path / "tls")
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok-123\n")
    (sa / "ca.crt").write_bytes(tls.ca_file.read_bytes())
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
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
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
