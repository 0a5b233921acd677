"""`make run`: the local cluster (already up), CRDs, the operator, the development kubelet, then a
TrainingJob that really trains (torchrun, DDP, encrypted checkpoints) and an InferenceService that
serves its checkpoint over the Open Inference Protocol — end to end, printing what happens."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Any

from cluster_processes import ClusterError, free_port, poll
from localcluster import ROOT, LocalCluster

NS = "aidc-demo"
PY = str(ROOT / ".venv" / "bin" / "python")


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def ensure_process(c: LocalCluster, name: str, argv: list[str], env_extra: dict[str, str]) -> None:
    if c.running_extra(name):
        say(f"{name} already running")
        return
    env = {
        **os.environ,
        "KUBECONFIG": str(c.kubeconfig),
        "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'hack' / 'cluster'}",
        **env_extra,
    }
    c.start_process(name, argv, env)
    say(f"started {name} (log: {c.logfile(name)})")


def get(c: LocalCluster, kind: str, name: str) -> dict[str, Any]:
    return json.loads(c.kubectl("get", kind, name, "-n", NS, "-o", "json"))


def main() -> int:
    state = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".state" / "cluster").resolve()
    c = LocalCluster.load(state)
    assert c.bin_dir is not None
    c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    c.wait_crds("trainingjobs.aidc.dev", "inferenceservices.aidc.dev")
    say("CRDs installed")
    health = free_port()
    ensure_process(
        c,
        "operator",
        [
            PY,
            "-m",
            "aidc_operator",
            "--standalone",
            "--metrics-port",
            str(free_port()),
            "--health-port",
            str(health),
        ],
        {},
    )
    ensure_process(
        c,
        "local-kubelet",
        [
            PY,
            str(ROOT / "hack" / "cluster" / "local_kubelet.py"),
            "--state-dir",
            str(state),
            "--namespace",
            NS,
        ],
        {},
    )

    volume = state / "volumes" / "demo-checkpoints"
    if not c.kubectl("get", "pv", f"{NS}-checkpoints", "--ignore-not-found", "-o", "name").strip():
        # A new cluster: checkpoints left from an earlier one are sealed with a key that died with it.
        shutil.rmtree(volume, ignore_errors=True)
    volume.mkdir(parents=True, exist_ok=True)
    c.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    pv_and_claim = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{NS}-checkpoints"},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": str(volume)},
                "claimRef": {"namespace": NS, "name": "demo-checkpoints"},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "demo-checkpoints", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": f"{NS}-checkpoints",
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    ]
    c.kubectl("apply", "-f", "-", input="\n".join(json.dumps(o) for o in pv_and_claim))
    poll(
        "the checkpoint PVC to bind",
        lambda: get(c, "pvc", "demo-checkpoints")["status"].get("phase") == "Bound",
        60,
    )
    say(f"checkpoint volume bound (hostPath {volume})")

    c.kubectl("apply", "-n", NS, "-f", str(ROOT / "examples" / "demo" / "trainingjob.yaml"))
    say("TrainingJob demo-mlp applied; training for real under torchrun (2 pods x 2 workers) ...")
    last = None

    def finished() -> bool:
        nonlocal last
        st = get(c, "trainingjob", "demo-mlp").get("status") or {}
        line = (
            st.get("phase"),
            (st.get("progress") or {}).get("step"),
            (st.get("lastCheckpoint") or {}).get("step"),
        )
        if line != last:
            say(f"  phase={line[0]} step={line[1]} lastCheckpoint={line[2]}")
            last = line
        if st.get("phase") == "Failed":
            raise ClusterError(f"the demo job failed: {st.get('lastFailure')}")
        for cond in st.get("conditions") or []:
            if cond.get("type") == "Invalid" and cond.get("status") == "True":
                raise ClusterError(f"the demo job is invalid: {cond.get('message')}")
        return st.get("phase") == "Succeeded"

    poll("the demo TrainingJob to succeed", finished, 600, 2)
    print(c.kubectl("get", "trainingjob", "-n", NS), flush=True)

    c.kubectl("apply", "-n", NS, "-f", str(ROOT / "examples" / "demo" / "inferenceservice.yaml"))
    say("InferenceService demo-mlp applied; waiting for a model server ...")
    pods_dir = state / "pods" / NS

    def server_address() -> str | None:
        pods = json.loads(
            c.kubectl("get", "pods", "-n", NS, "-l", "aidc.dev/inferenceservice=demo-mlp", "-o", "json")
        )["items"]
        for pod in pods:
            addr = pods_dir / pod["metadata"]["name"] / "address"
            if not addr.exists():
                continue
            host = addr.read_text()
            with urllib.request.urlopen(f"http://{host}:8080/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return host
        return None

    host = poll("a ready model server", server_address, 180, 1)
    meta = json.load(urllib.request.urlopen(f"http://{host}:8080/v2/models/demo-mlp", timeout=5))
    say(f"model server ready at {host}:8080, model version (checkpoint step) {meta.get('versions')}")
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": meta["inputs"][0]["name"],
                    "shape": [2, 10],
                    "datatype": "FP32",
                    "data": [0.1 * i for i in range(20)],
                }
            ]
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{host}:8080/v2/models/demo-mlp/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    out = json.load(urllib.request.urlopen(req, timeout=10))
    say(f"inference: {json.dumps(out)[:400]}")

    def isvc_ready() -> bool:  # the kubelet's probe marks the pod Ready; the operator then reports it
        st = json.loads(c.kubectl("get", "inferenceservice", "demo-mlp", "-n", NS, "-o", "json"))["status"]
        return st.get("phase") == "Ready" and bool(st.get("modelVersion"))

    poll("the InferenceService to report Ready", isvc_ready, 60, 1)
    print(c.kubectl("get", "trainingjob,inferenceservice,pods", "-n", NS), flush=True)
    say("done. The cluster, the operator and the local kubelet keep running:")
    print(
        f"  export KUBECONFIG={c.kubeconfig}\n  export PATH={c.bin_dir}:$PATH\n"
        f"  kubectl get tj,aisvc -n {NS}\n  make cluster-down    # stops everything",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClusterError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(1)
