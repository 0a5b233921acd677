"""A development kubelet: runs the containers of the local cluster's aidc pods as real local processes.

kwok plays the kubelet for scheduling and status, but runs nothing. For `make run` and the end-to-end
tests we want the trainer and the model server to really run from exactly what the operator rendered,
so this process watches pods bound to kwok nodes that carry an aidc label and, for each Running one:

- resolves its environment (values, downward API fields, Secret references) and volumes: Secret volumes
  become files, emptyDirs become directories, a PersistentVolumeClaim becomes its bound PV's hostPath;
  environment values under a mount path are rewritten to the local directory (the image's absolute
  paths do not exist here);
- gives each pod its own address: the pod IP kwok put in its status, added to the loopback device, so
  the apiserver's pod proxy reaches the pod's processes where the API says they are (without the
  privilege to add addresses, a 127.1.x.y address of its own, which the proxy refuses); resolves the
  cluster DNS names used in its environment (`<host>.<subdomain>.<ns>.svc`) to those addresses;
- runs the container's HTTP readiness probe as a kubelet does and writes the verdict to the pod's
  Ready condition, so a Deployment counts a model server ready only once it really is;
- mints a ServiceAccount token bound to the pod (TokenRequest) so in-pod API calls carry the pod's own
  identity and RBAC, as they would in a cluster;
- runs the command (torchrun/python from this project's virtualenv), and when it exits writes the
  kubelet's report — phase and terminated state with exit code and log tail — to the pod's status;
- kills the process when the pod is deleted, or with SIGKILL when its node's kwok agent is gone (the
  machine lost power).

    python hack/cluster/local_kubelet.py --state-dir .state/cluster [--namespace NS ...]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from localcluster import ROOT, LocalCluster, pod_address_label

log = logging.getLogger("local-kubelet")
AIDC_LABELS = ("aidc.dev/job-name", "aidc.dev/inferenceservice")
VENV_BIN = ROOT / ".venv" / "bin"
PYTHONPATH = os.pathsep.join(str(ROOT / p) for p in ("operator", "trainer", "server"))


@dataclass
class RunningPod:
    uid: str
    name: str
    namespace: str
    node: str
    proc: subprocess.Popen[bytes]
    dir: Path
    address: str
    container: str
    probe: dict[str, Any] | None = None  # the container's readinessProbe (httpGet only)
    ports: dict[str, int] = field(default_factory=dict)  # container port names
    ready: bool | None = None  # the last verdict written to the pod
    failures: int = 0  # consecutive failed probes
    next_probe: float = 0.0
    deleted_at: float | None = None


def _timestamp() -> str:
    """Now, as the kubelet writes times into pod status."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NotYet(Exception):
    """The pod cannot start in this sync (a pod it names has no IP yet); try again in the next."""


@dataclass
class Kubelet:
    cluster: LocalCluster
    namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.api = config.new_client_from_config(str(self.cluster.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.root = self.cluster.state_dir / "pods"
        self.running: dict[str, RunningPod] = {}
        self.finished: set[str] = set()
        self.addresses: dict[str, str] = {}  # "ns/pod" -> loopback address (fallback mode)
        self.label = pod_address_label(self.cluster.pod_net)
        self.pod_ips = self._can_add_addresses()
        if not self.pod_ips:
            log.warning("cannot add addresses to lo (needs CAP_NET_ADMIN): pods get 127.1.x.y addresses, "
                        "which the apiserver's pod proxy refuses")

    # addresses ------------------------------------------------------------
    def _ip(self, *args: str) -> bool:
        try:
            return subprocess.run(["ip", *args], capture_output=True).returncode == 0
        except OSError:
            return False

    def _can_add_addresses(self) -> bool:
        probe = f"{self.cluster.pod_net}.255.254/32"
        if not self._ip("-4", "addr", "add", probe, "dev", "lo", "label", self.label):
            return False
        self._ip("-4", "addr", "del", probe, "dev", "lo")
        return True

    def address_of(self, pod: dict[str, Any]) -> str:
        """The pod's IP from its status (kwok's); in fallback mode a loopback address of its own."""
        if self.pod_ips:
            ip = (pod.get("status") or {}).get("podIP")
            if not ip:
                raise NotYet(f"pod {pod['metadata']['name']} has no IP yet")
            return str(ip)
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        if key not in self.addresses:
            n = len(self.addresses) + 1
            self.addresses[key] = f"127.1.{n // 250}.{n % 250 + 1}"
        return self.addresses[key]

    def claim(self, address: str) -> None:
        # "exists" is fine: a kubelet restarted over running pods finds its addresses still there
        if self.pod_ips:
            self._ip("-4", "addr", "add", f"{address}/32", "dev", "lo", "label", self.label)

    def release(self, rp: RunningPod) -> None:
        if self.pod_ips:
            self._ip("-4", "addr", "del", f"{rp.address}/32", "dev", "lo")

    def resolve_dns(self, value: str, pods: list[dict[str, Any]]) -> str:
        """`host.subdomain.ns.svc[.cluster.local]` of a pod → that pod's address."""

        def repl(m: re.Match[str]) -> str:
            host, sub, ns = m.group(1), m.group(2), m.group(3)
            for p in pods:
                spec, meta = p["spec"], p["metadata"]
                if meta["namespace"] == ns and spec.get("hostname") == host and spec.get("subdomain") == sub:
                    return self.address_of(p)
            return m.group(0)

        return re.sub(r"\b([a-z0-9-]+)\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?\b", repl, value)

    # pods ---------------------------------------------------------------------
    def candidate_pods(self) -> list[dict[str, Any]]:
        pods = []
        for label in AIDC_LABELS:
            items = self.core.list_pod_for_all_namespaces(label_selector=label).items
            pods += [self.api.sanitize_for_serialization(p) for p in items]
        if self.namespaces:
            pods = [p for p in pods if p["metadata"]["namespace"] in self.namespaces]
        return pods

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes]:
        secret = self.core.read_namespaced_secret(name, namespace)
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def materialise_volumes(self, pod: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        """Volume name → local directory."""
        ns = pod["metadata"]["namespace"]
        local: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "secret" in vol:
                target = pod_dir / "volumes" / name
                target.mkdir(parents=True, exist_ok=True)
                data = self.secret_data(ns, vol["secret"]["secretName"])
                items = vol["secret"].get("items")
                mapping = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
                for key, path in mapping.items():
                    f = target / path
                    f.write_bytes(data[key])
                    f.chmod(0o400)
                local[name] = target
            elif "persistentVolumeClaim" in vol:
                claim = self.core.read_namespaced_persistent_volume_claim(
                    vol["persistentVolumeClaim"]["claimName"], ns
                )
                pv = self.core.read_persistent_volume(claim.spec.volume_name)
                if not pv.spec.host_path:
                    raise RuntimeError(f"PV {pv.metadata.name} is not a hostPath volume")
                local[name] = Path(pv.spec.host_path.path)
                local[name].mkdir(parents=True, exist_ok=True)
            elif "hostPath" in vol:
                local[name] = Path(vol["hostPath"]["path"])
            else:  # emptyDir and anything else: a private directory
                local[name] = pod_dir / "volumes" / name
                local[name].mkdir(parents=True, exist_ok=True)
        return local

    def service_account_dir(self, pod: dict[str, Any], pod_dir: Path) -> Path:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        token = self.core.create_namespaced_service_account_token(
            sa,
            ns,
            {
                "spec": {
                    "audiences": [],
                    "expirationSeconds": 3600,
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": name,
                        "uid": pod["metadata"]["uid"],
                    },
                }
            },
        ).status.token
        sa_dir = pod_dir / "serviceaccount"
        sa_dir.mkdir(parents=True, exist_ok=True)
        (sa_dir / "token").write_text(token)
        (sa_dir / "ca.crt").write_bytes((self.cluster.pki / "ca.crt").read_bytes())
        (sa_dir / "namespace").write_text(ns)
        return sa_dir

    def environment(
        self,
        pod: dict[str, Any],
        container: dict[str, Any],
        mounts: dict[str, Path],
        pods: list[dict[str, Any]],
        address: str,
        sa_dir: Path,
    ) -> dict[str, str]:
        meta = pod["metadata"]
        env: dict[str, str] = {}
        for var in container.get("env") or []:
            if "value" in var:
                value = var["value"]
            elif ref := (var.get("valueFrom") or {}).get("fieldRef"):
                value = {
                    "metadata.name": meta["name"],
                    "metadata.namespace": meta["namespace"],
                    "status.podIP": address,
                    "spec.nodeName": pod["spec"].get("nodeName", ""),
                }.get(ref["fieldPath"], "")
            elif ref := (var.get("valueFrom") or {}).get("secretKeyRef"):
                value = self.secret_data(meta["namespace"], ref["name"])[ref["key"]].decode()
            else:
                continue
            for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == mount_path or value.startswith(mount_path + "/"):
                    value = str(local) + value[len(mount_path) :]
                    break
            env[var["name"]] = self.resolve_dns(value, pods)
        return {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(mounts.get("/tmp", self.root)),
            "PYTHONPATH": PYTHONPATH,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "CUDA_VISIBLE_DEVICES": "",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.cluster.ports["apiserver"]),
            "AIDC_SERVICEACCOUNT_DIR": str(sa_dir),
            "AIDC_HOST": address,
            "AIDC_LOCAL_ADDRESS": address,
            **env,
        }

    def start(self, pod: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        meta = pod["metadata"]
        key = meta["uid"]
        pod_dir = self.root / meta["namespace"] / meta["name"]
        uid_file = pod_dir / "uid"
        if uid_file.exists() and uid_file.read_text() != key:
            # An earlier pod of the same name: a new pod starts with nothing of it (a stale key file in
            # its Secret volume would hide a key the Secret no longer holds).
            shutil.rmtree(pod_dir)
        pod_dir.mkdir(parents=True, exist_ok=True)
        uid_file.write_text(key)
        container = pod["spec"]["containers"][0]
        volumes = self.materialise_volumes(pod, pod_dir)
        mounts = {
            m["mountPath"]: volumes[m["name"]]
            for m in container.get("volumeMounts") or []
            if m["name"] in volumes
        }
        address = self.address_of(pod)
        env = self.environment(pod, container, mounts, pods, address, self.service_account_dir(pod, pod_dir))
        self.claim(address)
        # torchrun binds its rendezvous store to MASTER_ADDR: give the node the address it resolves to.
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if argv and argv[0] in ("torchrun", "python", "python3"):
            argv[0] = str(VENV_BIN / ("torchrun" if argv[0] == "torchrun" else "python"))
        if argv and argv[0].endswith("torchrun"):
            argv.insert(1, f"--local-addr={address}")
        probe = container.get("readinessProbe") or {}
        logfile = (pod_dir / "log").open("ab")
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=pod_dir,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        (pod_dir / "address").write_text(address)
        self.running[key] = RunningPod(
            key,
            meta["name"],
            meta["namespace"],
            pod["spec"]["nodeName"],
            proc,
            pod_dir,
            address,
            container["name"],
            probe=probe if "httpGet" in probe else None,
            ports={p["name"]: p["containerPort"] for p in container.get("ports") or [] if "name" in p},
        )
        if self.running[key].probe is not None:
            self.set_ready(self.running[key], False)  # a kubelet's verdict until the first probe passes
        log.info(
            "started %s/%s on %s at %s: %s",
            meta["namespace"],
            meta["name"],
            pod["spec"]["nodeName"],
            address,
            " ".join(argv),
        )

    def report_exit(self, rp: RunningPod, code: int) -> None:
        """What a kubelet writes when the container exits (terminationMessagePolicy FallbackToLogsOnError)."""
        now = _timestamp()
        tail = (rp.dir / "log").read_bytes()[-2048:].decode(errors="replace") if code else ""
        status = {
            "status": {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
                "containerStatuses": [
                    {
                        "name": rp.container,
                        "image": "local",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": "Completed" if code == 0 else "Error",
                                "message": tail,
                                "finishedAt": now,
                            }
                        },
                    }
                ],
            }
        }
        with contextlib.suppress(client.ApiException):  # a pod deleted meanwhile needs no report
            self.core.patch_namespaced_pod_status(rp.name, rp.namespace, status)
        log.info("%s/%s exited with %s", rp.namespace, rp.name, code)

    # readiness ----------------------------------------------------------------
    def probe_ok(self, rp: RunningPod) -> bool:
        """One HTTP readiness probe, as a kubelet runs it: any 2xx/3xx is success; TLS not verified."""
        get = rp.probe["httpGet"]  # type: ignore[index]
        port = get["port"] if isinstance(get["port"], int) else rp.ports.get(get["port"], 0)
        scheme = get.get("scheme", "HTTP").lower()
        ctx = None
        if scheme == "https":  # a kubelet does not verify a probe's certificate either
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        url = f"{scheme}://{rp.address}:{port}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=rp.probe.get("timeoutSeconds", 1), context=ctx) as r:  # type: ignore[union-attr]
                return 200 <= r.status < 400
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def set_ready(self, rp: RunningPod, ready: bool) -> None:
        """Write the verdict where the endpoint and deployment controllers read it."""
        now = _timestamp()
        value = "True" if ready else "False"
        status = {
            "status": {
                "conditions": [
                    {"type": t, "status": value, "lastTransitionTime": now}
                    for t in ("Ready", "ContainersReady")
                ],
                "containerStatuses": [
                    {"name": rp.container, "image": "local", "imageID": "", "ready": ready,
                     "restartCount": 0, "started": True, "state": {"running": {"startedAt": now}}}
                ],
            }
        }
        with contextlib.suppress(client.ApiException):
            self.core.patch_namespaced_pod_status(rp.name, rp.namespace, status)
            rp.ready = ready
            log.info("%s/%s is %sready", rp.namespace, rp.name, "" if ready else "not ")

    def probe_due(self) -> None:
        now = time.monotonic()
        for rp in self.running.values():
            if rp.probe is None or rp.deleted_at is not None or now < rp.next_probe:
                continue
            rp.next_probe = now + rp.probe.get("periodSeconds", 10)
            if self.probe_ok(rp):
                rp.failures = 0
                if rp.ready is not True:
                    self.set_ready(rp, True)
            else:
                rp.failures += 1
                if rp.ready is not False and rp.failures >= rp.probe.get("failureThreshold", 3):
                    self.set_ready(rp, False)

    def forget(self, uid: str) -> None:
        self.release(self.running.pop(uid))
        self.finished.add(uid)

    def kill(self, rp: RunningPod, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rp.proc.pid, sig)

    def sync(self) -> None:
        pods = self.candidate_pods()
        by_uid = {p["metadata"]["uid"]: p for p in pods}
        agents = self.cluster.running()
        for uid, rp in list(self.running.items()):
            pod = by_uid.get(uid)
            code = rp.proc.poll()
            if agents.get(f"kwok-{rp.node}") is None:
                # The node's machine is gone: its processes die with it, nobody reports anything.
                self.kill(rp, signal.SIGKILL)
                rp.proc.wait()
                self.forget(uid)
                log.info("node %s is down: killed %s/%s", rp.node, rp.namespace, rp.name)
            elif pod is None or pod["metadata"].get("deletionTimestamp"):
                if rp.deleted_at is None:
                    rp.deleted_at = time.monotonic()
                    self.kill(rp, signal.SIGTERM)
                grace = (pod or {}).get("spec", {}).get("terminationGracePeriodSeconds") or 30
                if code is None and time.monotonic() - rp.deleted_at > grace:
                    self.kill(rp, signal.SIGKILL)
                if rp.proc.poll() is not None:
                    self.forget(uid)
            elif code is not None:
                self.report_exit(rp, code)
                self.forget(uid)
        self.probe_due()
        # Every pod here shares one network namespace: a new pod must not start while a deleted one is
        # still shutting down, or it could find that pod's ports (rendezvous, metrics) still bound —
        # something separate network namespaces make impossible in a real cluster.
        if any(rp.deleted_at is not None for rp in self.running.values()):
            return
        for uid, pod in by_uid.items():
            phase = pod.get("status", {}).get("phase")
            node = pod["spec"].get("nodeName")
            if (
                uid in self.running
                or uid in self.finished
                or phase != "Running"
                or not node
                or pod["metadata"].get("deletionTimestamp")
                or agents.get(f"kwok-{node}") is None
            ):
                continue
            try:
                self.start(pod, pods)
            except NotYet as e:
                log.info("not starting %s yet: %s", pod["metadata"]["name"], e)
            except Exception as e:
                log.warning(
                    "cannot start %s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], e
                )
                self.finished.add(uid)

    def run(self, interval: float = 0.5) -> None:
        stop = False

        def on_term(*_: Any) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        while not stop:
            try:
                self.sync()
            except client.ApiException as e:
                log.warning("API error %s; retrying", e.status)
            except OSError as e:
                log.warning("%s; retrying", e)
            time.sleep(interval)
        for rp in self.running.values():
            self.kill(rp, signal.SIGTERM)
        for rp in self.running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                rp.proc.wait(10)
            self.release(rp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", type=Path, default=ROOT / ".state" / "cluster")
    ap.add_argument("--namespace", action="append", default=[])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Kubelet(LocalCluster.load(args.state_dir.resolve()), args.namespace).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
