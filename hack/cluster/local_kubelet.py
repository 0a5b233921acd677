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
- gives each pod a port space of its own for the ports its peers reach it on, by translation (all pods
  share the host's network namespace): the rendezvous port a job's pods name with their master's DNS
  name (MASTER_PORT, PET_MASTER_PORT, PET_RDZV_ENDPOINT) becomes one free host port per master pod, the
  same for the master and every pod naming it, so two jobs on the default 29500 both run (podnet.py);
- runs the container's HTTP readiness probe as a kubelet does and writes the verdict to the pod's
  Ready condition, so a Deployment counts a model server ready only once it really is;
- mints a ServiceAccount token bound to the pod (TokenRequest) so in-pod API calls carry the pod's own
  identity and RBAC, as they would in a cluster;
- runs the command (torchrun/python from this project's virtualenv) with marker variables that every
  process of the pod inherits (proctree.py), and when it exits writes the kubelet's report — phase and
  terminated state with exit code and termination message — to the pod's status (podstatus.py); the
  container's terminationMessagePath is a file in the pod's directory;
- when the pod is deleted, SIGTERMs every process of the pod and SIGKILLs what is left after the grace
  period, or once the main process is gone (as a container's other processes die with its PID 1);
- once a pod's processes are gone (it exited, was deleted, its node lost power, or the kubelet stopped),
  removes its Secret files, emptyDirs and token from the state dir (podspec.scrub); on start, does the
  same (and kills any process left) for the pod directories of pods that no longer exist;
- serves each node's /metrics/resource (kubelet_metrics.py: real CPU and memory of each pod's processes)
  at the node's InternalIP and advertised port, for metrics-server and so the HPA;
- when its node's kwok agent is gone, treats the node as powered off: LocalCluster.stop_node_agent has
  already killed the node's pod processes and addresses in one go (a power cut), and if the agent died
  otherwise this does the same; either way nobody reports anything for those pods and they never restart.

    python hack/cluster/local_kubelet.py --state-dir .state/cluster [--namespace NS ...]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config

import kubelet_metrics
import podnet
import podspec
import podstatus
import proctree
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
    message_policy: str = "File"  # the container's terminationMessagePolicy
    markers: dict[str, str] = field(default_factory=dict)  # what every process of the pod carries
    peers: set[str] = field(default_factory=set)  # uids of the pods whose host ports it was given


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
        self.net = podnet.Addresses(self.cluster.pod_net, pod_address_label(self.cluster.pod_net))
        self.ports = podnet.HostPorts(self.cluster.state_dir / "ports")
        if not self.net.pod_ips:
            log.warning(
                "cannot add addresses to lo (needs CAP_NET_ADMIN): pods get 127.1.x.y addresses, "
                "which the apiserver's pod proxy refuses"
            )
        self.clean_up_gone_pods()
        self.endpoints = kubelet_metrics.NodeEndpoints(self.core, self.cluster, self.pod_refs)

    def pod_refs(self) -> list[kubelet_metrics.PodRef]:  # called from the metrics servers' threads
        pods = list(self.running.values())
        return [kubelet_metrics.PodRef(p.namespace, p.name, p.container, p.node, p.markers) for p in pods]

    def serves(self, namespace: str) -> bool:
        return not self.namespaces or namespace in self.namespaces

    def clean_up_gone_pods(self) -> None:
        """A kubelet that stopped uncleanly (or whose pods were deleted while it was down) left pod
        directories behind: for pods that no longer exist, kill what still runs and remove the secrets."""
        try:
            live = {p["metadata"]["uid"] for p in self.candidate_pods()}
        except client.ApiException as e:
            log.warning("cannot list pods (API error %s): no clean-up of gone pods", e.status)
            return
        for uid_file in self.root.glob("*/*/uid"):
            pod_dir = uid_file.parent
            if not self.serves(pod_dir.parent.name):
                continue
            with contextlib.suppress(OSError):
                uid, node_file = uid_file.read_text(), pod_dir / "node"
                if uid in live:
                    continue
                if node_file.exists():
                    with contextlib.suppress(RuntimeError):
                        proctree.power_cut(
                            proctree.markers(self.cluster.state_dir, node_file.read_text(), uid)
                        )
                podspec.scrub(pod_dir)
        self.ports.release(lambda ns, uid: self.serves(ns) and uid not in live)

    # pods ---------------------------------------------------------------------
    def candidate_pods(self) -> list[dict[str, Any]]:
        pods = []
        for label in AIDC_LABELS:
            items = self.core.list_pod_for_all_namespaces(label_selector=label).items
            pods += [self.api.sanitize_for_serialization(p) for p in items]
        if self.namespaces:
            pods = [p for p in pods if p["metadata"]["namespace"] in self.namespaces]
        return pods

    def environment(
        self,
        pod: dict[str, Any],
        container: dict[str, Any],
        files: dict[str, Path],
        pods: list[dict[str, Any]],
        address: str,
        sa_dir: Path,
        peers: set[str],
    ) -> dict[str, str]:
        """The process's environment; peers gets the uids of the pods whose host ports it names."""
        env = podspec.container_env(self.core, pod, container, files, address)

        def host_port(target: dict[str, Any], port: int) -> int:
            peers.add(target["metadata"]["uid"])
            return self.ports.get(target["metadata"]["namespace"], target["metadata"]["uid"], port)

        env = podnet.rewrite_env(env, pods, self.net.of, host_port)
        return {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(files.get("/tmp", self.root)),
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
        volumes = podspec.materialise_volumes(self.core, pod, pod_dir)
        mounts = {
            m["mountPath"]: volumes[m["name"]]
            for m in container.get("volumeMounts") or []
            if m["name"] in volumes
        }
        address = self.net.of(pod)
        # terminationMessagePath: a file of the pod's, its path in env values rewritten like a mount's.
        termination_log = pod_dir / "termination-log"
        termination_log.write_bytes(b"")
        term_path = container.get("terminationMessagePath") or podstatus.DEFAULT_TERMINATION_PATH
        files = {**mounts, term_path: termination_log}
        sa_dir = podspec.service_account_dir(self.core, pod, pod_dir, self.cluster.pki / "ca.crt")
        markers = proctree.markers(self.cluster.state_dir, pod["spec"]["nodeName"], key)
        peers: set[str] = set()
        env = {**self.environment(pod, container, files, pods, address, sa_dir, peers), **markers}
        (pod_dir / "node").write_text(pod["spec"]["nodeName"])  # stop_node_agent finds the address by it
        self.net.claim(address)
        # torchrun binds its rendezvous store to MASTER_ADDR: give the node the address it resolves to.
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if argv and argv[0] in ("torchrun", "python", "python3"):
            argv[0] = str(VENV_BIN / ("torchrun" if argv[0] == "torchrun" else "python"))
        if argv and argv[0].endswith("torchrun"):
            argv.insert(1, f"--local-addr={address}")
        probe = container.get("readinessProbe") or {}
        with (pod_dir / "log").open("ab") as logfile:  # the child keeps a descriptor of its own
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
            message_policy=container.get("terminationMessagePolicy") or "File",
            markers=markers,
            peers=peers,
        )
        if self.running[key].probe is not None:
            self.set_ready(self.running[key], False)  # a kubelet's verdict until the first probe passes
        declared = {v["name"]: v.get("value") for v in container.get("env") or []}
        translated = {
            k: env[k] for k in declared if k.endswith(("_PORT", "_ENDPOINT")) and env.get(k) != declared[k]
        }
        log.info(
            "started %s/%s on %s at %s (%s): %s",
            meta["namespace"],
            meta["name"],
            pod["spec"]["nodeName"],
            address,
            ", ".join(f"{k}={v}" for k, v in sorted(translated.items())) or "no ports translated",
            " ".join(argv),
        )

    def report_exit(self, rp: RunningPod, returncode: int) -> None:
        """What a kubelet writes when the container exits: phase, exit code, reason, termination message."""
        code = podstatus.exit_code(returncode)
        message = podstatus.termination_message(
            rp.dir / "termination-log", rp.dir / "log", code, rp.message_policy
        )
        with contextlib.suppress(client.ApiException):  # a pod deleted meanwhile needs no report
            self.core.patch_namespaced_pod_status(
                rp.name, rp.namespace, podstatus.terminated(rp.container, code, message)
            )
        log.info("%s/%s exited with %s", rp.namespace, rp.name, code)

    # readiness ----------------------------------------------------------------
    def set_ready(self, rp: RunningPod, ready: bool) -> None:
        with contextlib.suppress(client.ApiException):
            self.core.patch_namespaced_pod_status(
                rp.name, rp.namespace, podstatus.readiness(rp.container, ready)
            )
            rp.ready = ready
            log.info("%s/%s is %sready", rp.namespace, rp.name, "" if ready else "not ")

    def probe_due(self) -> None:
        now = time.monotonic()
        for rp in self.running.values():
            if rp.probe is None or rp.deleted_at is not None or now < rp.next_probe:
                continue
            rp.next_probe = now + rp.probe.get("periodSeconds", 10)
            if podstatus.probe_ok(rp.address, rp.probe, rp.ports):
                rp.failures = 0
                if rp.ready is not True:
                    self.set_ready(rp, True)
            else:
                rp.failures += 1
                if rp.ready is not False and rp.failures >= rp.probe.get("failureThreshold", 3):
                    self.set_ready(rp, False)

    def forget(self, uid: str) -> None:
        """The pod's processes are gone: its address leaves lo and its secrets leave the disk."""
        rp = self.running.pop(uid)
        self.net.release(rp.address)
        podspec.scrub(rp.dir)
        self.finished.add(uid)

    def signal_pod(self, rp: RunningPod, sig: int) -> None:
        """sig to every process of the pod: torchrun starts its workers in sessions of their own."""
        proctree.send(proctree.find(rp.markers), sig)

    def kill_pod(self, rp: RunningPod) -> None:
        """Every process of the pod dies at once (all stopped, then all killed); the main one is reaped."""
        try:
            proctree.power_cut(rp.markers)
        except RuntimeError as e:
            log.warning("%s/%s: %s", rp.namespace, rp.name, e)
        with contextlib.suppress(subprocess.TimeoutExpired):
            rp.proc.wait(10)

    def node_up(self, node: str) -> bool:
        return self.cluster.running_extra(f"kwok-{node}") is not None

    def sync(self) -> None:
        pods = self.candidate_pods()
        by_uid = {p["metadata"]["uid"]: p for p in pods}
        for uid, rp in list(self.running.items()):
            pod = by_uid.get(uid)
            code = rp.proc.poll()
            # The agent is asked after the poll: stop_node_agent kills it before the pod's processes, so
            # an exit seen while the agent still runs is the pod's own, never the power cut's.
            if not self.node_up(rp.node):
                # The node lost power: its processes died with it (stop_node_agent killed them; this is
                # for an agent that died otherwise). Nobody reports anything, nothing restarts.
                self.kill_pod(rp)
                self.forget(uid)
                log.info("node %s is down: %s/%s is gone", rp.node, rp.namespace, rp.name)
            elif pod is None or pod["metadata"].get("deletionTimestamp"):
                if rp.deleted_at is None:
                    rp.deleted_at = time.monotonic()
                    self.signal_pod(rp, signal.SIGTERM)
                grace = (pod or {}).get("spec", {}).get("terminationGracePeriodSeconds") or 30
                # What is left dies with the main process, as a container's processes die with its PID 1.
                if code is not None or time.monotonic() - rp.deleted_at > grace:
                    self.kill_pod(rp)
                    self.forget(uid)
            elif code is not None:
                self.kill_pod(rp)
                self.report_exit(rp, code)
                self.forget(uid)
        self.probe_due()
        self.endpoints.maintain()
        # A host port is free again once its pod is gone and none of the pods naming it runs here (a
        # peer still shutting down must not reach another job's store on a reused port).
        in_use = set(self.running).union(*(rp.peers for rp in self.running.values()))
        self.ports.release(lambda ns, uid: self.serves(ns) and uid not in by_uid and uid not in in_use)
        agents = self.cluster.running()
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
            meta = pod["metadata"]
            try:
                self.start(pod, pods)
            except podnet.NotYet as e:
                podspec.scrub(self.root / meta["namespace"] / meta["name"])  # written again next time
                log.info("not starting %s yet: %s", meta["name"], e)
            except Exception as e:
                podspec.scrub(self.root / meta["namespace"] / meta["name"])
                log.warning("cannot start %s/%s: %s", meta["namespace"], meta["name"], e)
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
            self.signal_pod(rp, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for rp in self.running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                rp.proc.wait(max(0.1, deadline - time.monotonic()))
            self.kill_pod(rp)
            self.net.release(rp.address)
            podspec.scrub(rp.dir)
        self.endpoints.close()


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
