"""The benchmarks' peer: Kubeflow's training-operator v1.8.1, built from the Go module pinned in
bench/peers/training-operator/go.mod and run out of cluster against a local cluster's kubeconfig.

    bin_dir = ensure_built()                      # bench/peers/build.sh, cached in ~/.cache/aidc/bin
    install_crd(cluster.kubectl, bin_dir)         # PyTorchJob CRD + the kubeflow namespace + cert Secret
    proc = start(bin_dir, cluster.kubeconfig, log, metrics_port, health_port)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pytorchjob("j1", ns)))
    cluster.kubectl("get", "pods", "-n", ns, "-l", pods_selector("j1"))

Running it out of cluster. v1.8.1 has no flag to turn off its webhook server or its cert rotator
(open-policy-agent/cert-controller), and it registers its controllers only once the rotator reports
the certificates ready. What the rotator needs, and what this module provides in its place:

- The Secret `training-operator-webhook-cert` in the operator's namespace (MY_POD_NAMESPACE, else
  `kubeflow`) must exist; the rotator fills in a CA and serving cert. The release's standalone overlay
  creates it empty, and so does install_crd (with the namespace).
- The serving cert must be "mounted": the rotator waits for tls.crt in the hard-coded directory
  /tmp/k8s-webhook-server/serving-certs (where the Deployment mounts that Secret), and the webhook
  server, once started, serves tls.crt/tls.key from $TMPDIR/k8s-webhook-server/serving-certs. start()
  writes a self-signed localhost pair there and pins TMPDIR=/tmp so both read the same directory.
  That path is fixed by the binary, so peers on one machine share it (each start rewrites the pair
  atomically; any valid pair will do).
- The CA is injected into the ValidatingWebhookConfiguration `validator.training-operator.kubeflow.org`,
  which is not installed: the rotator logs "Webhook not found", counts that as done, and the operator
  becomes ready. The apiserver could not reach an in-cluster webhook Service on loopback anyway, so
  PyTorchJobs are not validated by the peer's webhook (the CRD's OpenAPI schema still applies).

Flags: --enable-scheme=pytorchjob (only the PyTorchJob controller and scheme), --gang-scheduler-name=
(empty: no volcano or scheduler-plugins PodGroups), --leader-elect=false, metrics and probes on
127.0.0.1, a free --webhook-server-port (default 9443 could clash). Everything else, logging included
(zap development mode) and --controller-threads=1, is the release's default, as its Deployment runs it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cluster_pki import issue_cert, new_key, pem_key, x509_name
from cluster_processes import free_port

BUILD_SCRIPT = Path(__file__).resolve().parent / "peers" / "build.sh"
BINARY = "training-operator"
CRD_FILE = "kubeflow.org_pytorchjobs.yaml"
CRD_NAME = "pytorchjobs.kubeflow.org"
OPERATOR_NAMESPACE = "kubeflow"  # the release's; MY_POD_NAMESPACE tells the binary
WEBHOOK_SECRET = "training-operator-webhook-cert"  # the binary's --webhook-secret-name default
CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")  # hard-coded in pkg/cert (v1.8.1)
IMAGE = "aidc-bench/noop:1"  # never pulled: pods run on kwok's fake nodes
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
OPERATOR_NAME_LABEL = "training.kubeflow.org/operator-name"


def ensure_built() -> Path:
    """Builds the peer on first use (several minutes on 2 cores; cached after) and returns the
    directory holding the `training-operator` binary and the PyTorchJob CRD."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{BUILD_SCRIPT} failed (output above); fix that and rerun")
    return Path(lines[-1])


def install_crd(kubectl: Callable[..., str], bin_dir: Path, timeout: float = 60) -> None:
    """Applies the PyTorchJob CRD (server-side: it is too large for the last-applied annotation), waits
    until it is Established, and creates what the peer's cert rotator expects to find: the `kubeflow`
    namespace and an empty Secret for the webhook certificates. Idempotent."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(bin_dir / CRD_FILE))
    # Polled rather than `kubectl wait`, which fails outright while the new CRD has no conditions yet.
    established = '{.status.conditions[?(@.type=="Established")].status}'
    deadline = time.monotonic() + timeout
    while kubectl("get", "crd", CRD_NAME, "-o", f"jsonpath={established}", check=False).strip() != "True":
        if time.monotonic() > deadline:
            raise RuntimeError(f"CRD {CRD_NAME} not Established after {timeout:.0f}s")
        time.sleep(0.2)
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": WEBHOOK_SECRET, "namespace": OPERATOR_NAMESPACE},
        },
    ]
    kubectl("apply", "--server-side", "-f", "-", input="\n".join(json.dumps(o) for o in objects))


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_serving_cert(cert_dir: Path) -> None:
    """A self-signed localhost pair for the webhook server, which nothing calls (see the module doc),
    made with the local cluster's own certificate helpers."""
    key = new_key()
    name = x509_name("training-operator.kubeflow.svc")
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("training-operator.kubeflow.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = issue_cert(name, key, name, key, sans=sans, server=True)
    cert_dir.mkdir(parents=True, exist_ok=True)
    # The key first: the rotator takes tls.crt appearing as "mounted".
    _write_atomically(cert_dir / "tls.key", pem_key(key), 0o600)
    _write_atomically(cert_dir / "tls.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:  # refused, reset, an HTTP error status (URLError is an OSError)
        return False


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def start(
    bin_dir: Path,
    kubeconfig: Path,
    log_path: Path,
    metrics_port: int,
    health_port: int,
    timeout: float = 120,
) -> subprocess.Popen[bytes]:
    """Starts the training-operator out of cluster (PyTorchJob only, no gang scheduler, no leader
    election), its output appended to log_path, and returns once its /readyz answers 200: certs
    "mounted", controllers registered, webhook server listening. install_crd must have run. The
    caller stops it (terminate(), then wait()); if it fails to become ready it is killed and a
    RuntimeError carries the end of its log.

    On SIGTERM v1.8.1 shuts down cleanly and then exits 2 with "panic: close of closed channel"
    (main.go closes certsReady, which the rotator has already closed): an upstream bug, not a failure."""
    _write_serving_cert(CERT_DIR)
    argv = [
        str(bin_dir / BINARY),
        f"--kubeconfig={kubeconfig}",
        "--enable-scheme=pytorchjob",
        "--gang-scheduler-name=",
        "--leader-elect=false",
        f"--metrics-bind-address=127.0.0.1:{metrics_port}",
        f"--health-probe-bind-address=127.0.0.1:{health_port}",
        f"--webhook-server-port={free_port()}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "KUBEFLOW_NAMESPACE"}  # else it watches one ns
    env |= {"KUBECONFIG": str(kubeconfig), "MY_POD_NAMESPACE": OPERATOR_NAMESPACE, "TMPDIR": "/tmp"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{health_port}/readyz"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"training-operator exited ({proc.returncode}) during start-up; "
                f"last log lines ({log_path}):\n{_tail(log_path)}"
            )
        if _ok(url):
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                f"training-operator not ready on {url} after {timeout:.0f}s; "
                f"last log lines ({log_path}):\n{_tail(log_path)}"
            )
        time.sleep(0.3)


def _replica(replicas: int, gpus: int) -> dict:
    container: dict = {"name": "pytorch", "image": IMAGE}  # the controller looks for "pytorch"
    if gpus:
        gpu = {"nvidia.com/gpu": str(gpus)}
        container["resources"] = {"requests": dict(gpu), "limits": dict(gpu)}
    return {
        "replicas": replicas,
        "restartPolicy": "OnFailure",
        "template": {"spec": {"containers": [container]}},
    }


def pytorchjob(name: str, namespace: str, workers: int = 3, gpus: int = 1) -> dict:
    """A kubeflow.org/v1 PyTorchJob: 1 Master + `workers` Workers, each asking for `gpus` GPUs."""
    specs = {"Master": _replica(1, gpus)}
    if workers:
        specs["Worker"] = _replica(workers, gpus)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"pytorchReplicaSpecs": specs},
    }


def pods_selector(name: str) -> str:
    """The label selector of the pods the training-operator creates for PyTorchJob `name`."""
    return f"{OPERATOR_NAME_LABEL}=pytorchjob-controller,{JOB_NAME_LABEL}={name}"
