"""Node failure → gang running again elsewhere, on a dedicated local cluster (kube-apiserver,
controller-manager with the node lifecycle controller, scheduler, one kwok agent per node). Each trial
runs a 2-pod gang and at t0 cuts the power of the node under rank 1 (LocalCluster.stop_node_agent: its
kwok agent is SIGKILLed, so its Lease lapses, and every process of its pods dies at once with its
address). Two modes:

- power-cut (the default): the gang really trains. The development kubelet runs each pod's torchrun
  and trainer (mlp example, checkpoints every --interval steps on a hostPath volume), so the node's
  worker dies mid-step with no final checkpoint. Per trial: kill → every replica Running on healthy
  nodes, kill → the new attempt's resume and first training step (from the trainer's JSON logs in the
  pod directories), and the steps lost: the step the dead attempt had reached minus the step the new
  one resumed from. Goal: at most one checkpoint interval lost, in every trial.
- agent-only: pods run no processes, and the same gang as a Deployment is the baseline: what a
  controller relying on Kubernetes' own eviction gets (the node lifecycle controller marks the node
  after --node-monitor-grace-period, the taint manager evicts after the default tolerationSeconds
  (300 s), the ReplicaSet controller replaces the pod). (A batch/v1 Job would do the same, but kwok's
  default stages complete Job-owned pods at once.) The default path takes minutes per trial, so its
  trials run side by side in one failure event; aidc's run one after another.

    python bench/node_failure.py [--mode power-cut] [--trials 5] [--interval 100] [--grace 20s]
        [--nodes 2] [--policies RestartGang,ReplaceNode,ReplaceNode+spare]
    python bench/node_failure.py --mode agent-only [--trials 10] [--default-trials 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "hack" / "cluster"), str(ROOT / "operator")]

from _operator_run import operator_on  # noqa: E402

from aidc_operator.api.trainingjob import TrainingJobSpec  # noqa: E402
from aidc_operator.builders import trainingjob as build  # noqa: E402
from aidc_operator.builders.common import Owner  # noqa: E402
from cluster_processes import ClusterError, poll  # noqa: E402
from localcluster import LocalCluster  # noqa: E402

NS = "bench-nodefail"
PODS = ROOT / ".state" / "bench-node-failure" / "pods" / NS  # the development kubelet's pod dirs


def kubectl_json(c: LocalCluster, *args: str) -> dict:
    return json.loads(c.kubectl(*args, "-o", "json"))


def running_pods(c: LocalCluster, selector: str) -> list[dict]:
    pods = kubectl_json(c, "get", "pods", "-n", NS, "-l", selector)["items"]
    return [
        p
        for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def gang_moved(c: LocalCluster, sel: str, victim: str, count: int = 2, new_attempt: bool = True) -> bool:
    """All `count` pods Running, none on the dead node (and, for a gang restart, of a later attempt)."""
    pods = running_pods(c, sel)
    return len(pods) == count and all(
        p["spec"]["nodeName"] != victim
        and (not new_attempt or p["metadata"]["labels"]["aidc.dev/attempt"] != "0")
        for p in pods
    )


def all_nodes_ready(c: LocalCluster) -> bool:
    nodes = kubectl_json(c, "get", "nodes")["items"]
    return len(nodes) == c.nodes and all(
        any(x["type"] == "Ready" and x["status"] == "True" for x in n["status"]["conditions"])
        and not any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints") or [])
        for n in nodes
    )


def restore(c: LocalCluster, node: str) -> None:
    c.start_node_agent(node)
    poll("all nodes Ready and untainted", lambda: all_nodes_ready(c), 120)


def aidc_trial(c: LocalCluster, i: int) -> float:
    name = f"aidc-{i}"
    c.kubectl(
        "apply",
        "-n",
        NS,
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "aidc.dev/v1alpha1",
                "kind": "TrainingJob",
                "metadata": {"name": name},
                "spec": {"nodes": 2, "procPerNode": 1, "checkpoint": {"encryption": {"enabled": False}}},
            }
        ),
    )
    sel = f"aidc.dev/job-name={name}"
    poll(f"{name} running", lambda: len(running_pods(c, sel)) == 2, 60)
    victim = next(
        p["spec"]["nodeName"]
        for p in running_pods(c, sel)
        if p["metadata"]["labels"]["aidc.dev/node-rank"] == "1"
    )
    t0 = time.monotonic()
    c.stop_node_agent(victim)
    poll(
        f"{name} recovered",
        lambda: gang_moved(c, sel, victim),
        300,
        0.1,
    )
    elapsed = time.monotonic() - t0
    c.kubectl("delete", "trainingjob", name, "-n", NS, "--wait=false")
    restore(c, victim)
    return elapsed


def default_job(i: int) -> dict:
    """The same pod a TrainingJob rank gets, owned by a Deployment instead."""
    spec = TrainingJobSpec.model_validate(
        {"nodes": 2, "procPerNode": 1, "checkpoint": {"encryption": {"enabled": False}}}
    )
    pod = build.pod(Owner("TrainingJob", f"default-{i}", NS, "none"), spec, rank=0, attempt=0)
    pod_spec = pod["spec"]
    pod_spec["restartPolicy"] = "Always"  # the only policy a Deployment accepts
    for key in ("hostname", "subdomain"):
        pod_spec.pop(key)
    pod_spec["serviceAccountName"] = "default"
    pod_spec["volumes"] = [v for v in pod_spec["volumes"] if "secret" not in v]
    labels = {"bench": f"default-{i}"}
    pod_spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
        "labelSelector"
    ] = {"matchLabels": labels}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"default-{i}"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def default_trials(c: LocalCluster, n: int) -> list[float]:
    victim = "gpu-node-1"
    # Prefer the victim for one pod of every job so that one failure event serves all trials.
    for i in range(n):
        job = default_job(i)
        job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"] = {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "preference": {
                        "matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": [victim]}
                        ]
                    },
                }
            ]
        }
        c.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(job))
    poll(
        "default jobs running",
        lambda: all(len(running_pods(c, f"bench=default-{i}")) == 2 for i in range(n)),
        120,
    )
    on_victim = [
        i
        for i in range(n)
        if any(p["spec"]["nodeName"] == victim for p in running_pods(c, f"bench=default-{i}"))
    ]
    t0 = time.monotonic()
    c.stop_node_agent(victim)
    done: dict[int, float] = {}
    while len(done) < len(on_victim) and time.monotonic() - t0 < 900:
        for i in on_victim:
            if i not in done:
                pods = running_pods(c, f"bench=default-{i}")
                if len(pods) == 2 and all(p["spec"]["nodeName"] != victim for p in pods):
                    done[i] = time.monotonic() - t0
        time.sleep(0.5)
    restore(c, victim)
    return list(done.values())


# ---------------------------------------------------------------- power-cut mode (real trainers)


def hostpath_claim(c: LocalCluster, path: Path) -> None:
    """The checkpoint volume: a hostPath PV bound to PVC ckpt."""
    path.mkdir(parents=True, exist_ok=True)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{NS}-ckpt"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "hostPath": {"path": str(path)},
            "claimRef": {"namespace": NS, "name": "ckpt"},
            "persistentVolumeReclaimPolicy": "Retain",
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "ckpt", "namespace": NS},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": f"{NS}-ckpt",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    c.kubectl("apply", "-f", "-", input="\n".join(json.dumps(o) for o in (pv, pvc)))
    poll(
        "PVC bound",
        lambda: kubectl_json(c, "get", "pvc", "ckpt", "-n", NS)["status"].get("phase") == "Bound",
        60,
    )


def events(log: Path) -> list[dict[str, Any]]:
    """The trainer's JSON log lines in a pod's log (torchrun's own lines are not JSON)."""
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wall(event: dict[str, Any]) -> float:
    return dt.datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


POLICIES = {  # power-cut mode, side by side (bench/node_replace.py: the same at 4-64 pods on kwok)
    "RestartGang": {"nodeFailure": "RestartGang"},
    "ReplaceNode": {"nodeFailure": "ReplaceNode"},
    "ReplaceNode+spare": {"nodeFailure": "ReplaceNode", "spareNodes": 1},
}


def after(logs: list[Path], t0_wall: float, event: str) -> dict | None:
    """The first `event` any of the gang's pods logged after t0 (the trainer's global rank 0 may run in
    any pod of a c10d rendezvous)."""
    found = [e for log in logs for e in events(log) if e.get("event") == event and wall(e) > t0_wall]
    return min(found, key=wall, default=None)


def power_cut_trial(c: LocalCluster, i: int, interval: int, policy: str, nodes: int) -> dict[str, Any]:
    name = f"pc-{i}"
    # Every step logged (a control sync each step) so the step the dead attempt reached is exact.
    command = ["python", "-m", "aidc_trainer", "--example", "mlp", "--steps", "10000000", "--eval-every", "0"]
    command += ["--log-every", "1", "--log-every-seconds", "0", "--progress-every-seconds", "1"]
    spec = {
        "command": command,
        "nodes": nodes,
        "procPerNode": 1,
        "gpusPerNode": 1,
        "checkpoint": {"volume": {"persistentVolumeClaim": {"claimName": "ckpt"}}, "everySteps": interval},
        "failurePolicy": POLICIES[policy],
    }
    job = {"apiVersion": "aidc.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name}, "spec": spec}
    c.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(job))
    sel = f"aidc.dev/job-name={name}"

    def checkpointed() -> int:
        status = kubectl_json(c, "get", "trainingjob", name, "-n", NS).get("status") or {}
        if status.get("phase") == "Failed":
            raise ClusterError(f"{name} failed: {status.get('lastFailure') or status.get('conditions')}")
        return (status.get("lastCheckpoint") or {}).get("step", 0)

    # Budgets, not goals: torch start-up and two checkpoint intervals on a loaded machine.
    poll(f"{name} past two checkpoints", lambda: checkpointed() >= 2 * interval, 600, 0.5)
    before = [PODS / p["metadata"]["name"] / "log" for p in running_pods(c, sel)]
    before_uids = {p["metadata"]["uid"] for p in running_pods(c, sel)}
    # a pod that trains (with a spare, which one stands by is torch's choice), never the rendezvous host
    victim = next(
        p["spec"]["nodeName"]
        for p in running_pods(c, sel)
        if p["metadata"]["labels"]["aidc.dev/node-rank"] != "0"
        and any(e.get("event") == "resume" for e in events(PODS / p["metadata"]["name"] / "log"))
    )
    time.sleep(random.uniform(0, 2))  # cut at a random point of a checkpoint interval
    t0_wall, t0 = time.time(), time.monotonic()
    c.stop_node_agent(victim)
    count = nodes + POLICIES[policy].get("spareNodes", 0)
    restart = policy == "RestartGang"
    poll(f"{name} Running again", lambda: gang_moved(c, sel, victim, count, restart), 300, 0.1)
    running_s = time.monotonic() - t0

    def resumed_and_stepped() -> tuple[dict, dict] | None:
        logs = [PODS / p["metadata"]["name"] / "log" for p in running_pods(c, sel)]
        resume = after(logs, t0_wall, "resume")
        # the first step *after the resume*: a survivor may log one more step of the old run after t0
        step = after(logs, wall(resume), "train") if resume else None
        return (resume, step) if resume and step else None

    resume, first = poll(f"{name}'s first step after the resume", resumed_and_stepped, 600, 0.5)
    trained = [e for log in before for e in events(log) if e.get("event") == "train"]
    reached = max((e["step"] for e in trained if wall(e) <= t0_wall), default=0)
    uids = {p["metadata"]["uid"] for p in running_pods(c, sel)}
    c.kubectl("delete", "trainingjob", name, "-n", NS, "--wait=false")
    restore(c, victim)
    return {
        "policy": policy,
        "pods_kept": len(uids & before_uids),
        "running_s": round(running_s, 1),
        "resume_s": round(wall(resume) - t0_wall, 1),
        "first_step_s": round(wall(first) - t0_wall, 1),
        "reached_step": reached,
        "resumed_step": resume["step"],
        "steps_lost": reached - resume["step"],
    }


def power_cut_mode(c: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    # A checkpoint left by an earlier run is encrypted with a key this cluster never had.
    shutil.rmtree(c.state_dir / "ckpt", ignore_errors=True)
    hostpath_claim(c, c.state_dir / "ckpt")
    kubelet = [
        sys.executable,
        str(ROOT / "hack" / "cluster" / "local_kubelet.py"),
        "--state-dir",
        str(c.state_dir),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'hack' / 'cluster'}:{ROOT / 'operator'}"}
    c.start_process("local-kubelet", [*kubelet, "--namespace", NS], env=env)  # down() stops it
    trials = []
    policies = args.policies.split(",")
    for i in range(args.trials):  # interleaved: drift on the machine hits every policy alike
        for k, policy in enumerate(policies):
            trials.append(power_cut_trial(c, i * len(policies) + k, args.interval, policy, args.nodes))
            print(f"power-cut trial {i}: {json.dumps(trials[-1])}", flush=True)
    met = [t for t in trials if t["steps_lost"] <= args.interval]
    print(f"\nnode-monitor-grace-period={args.grace}, kwok lease 10s, checkpoint every {args.interval} steps")
    for policy in policies:
        mine = [t for t in trials if t["policy"] == policy]
        kept = sorted({t["pods_kept"] for t in mine})
        print(f"{policy}: {args.nodes} nodes, pods kept per recovery {kept}")
        print(f"  kill -> gang Running     : {summary([t['running_s'] for t in mine])}")
        print(f"  kill -> resumed          : {summary([t['resume_s'] for t in mine])}")
        print(f"  kill -> first step       : {summary([t['first_step_s'] for t in mine])}")
    lost = [t["steps_lost"] for t in trials]
    print(f"steps lost                 : median {statistics.median(lost)}, max {max(lost)}, min {min(lost)}")
    share = 100 * len(met) / len(trials)
    print(f"goal: <= {args.interval} steps lost -> met in {len(met)}/{len(trials)} trials ({share:.0f} %)")
    return {
        "checkpoint_every_steps": args.interval,
        "trials": trials,
        "met_percent": share,
    }


def summary(xs: list[float]) -> str:
    return f"n={len(xs)} median={statistics.median(xs):.1f}s max={max(xs):.1f}s min={min(xs):.1f}s"


def agent_only_mode(c: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    aidc = []
    for i in range(args.trials):
        aidc.append(aidc_trial(c, i))
        print(f"aidc    trial {i}: {aidc[-1]:.1f}s", flush=True)
    default = default_trials(c, args.default_trials) if args.default_trials else []
    for i, t in enumerate(default):
        print(f"default trial {i}: {t:.1f}s", flush=True)
    print(f"\nnode-monitor-grace-period={args.grace}, kwok lease duration 10s, {c.nodes} nodes")
    print(f"aidc TrainingJob    : {summary(aidc)}")
    if default:
        print(f"default (Deployment): {summary(default)}")
        print(f"speed-up (median)   : {statistics.median(default) / statistics.median(aidc):.1f}x")
    goal = float(args.grace.rstrip("s")) + 15
    print(f"goal: aidc max <= grace + 15 s = {goal:.0f}s -> {'met' if max(aidc) <= goal else 'NOT met'}")
    return {"aidc_seconds": [round(t, 1) for t in aidc], "default_seconds": [round(t, 1) for t in default]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["power-cut", "agent-only"], default="power-cut")
    ap.add_argument(
        "--trials", type=int, default=None, help="aidc trials (default: 5 power-cut, 10 agent-only)"
    )
    ap.add_argument("--default-trials", type=int, default=3, help="agent-only: baseline trials")
    ap.add_argument("--interval", type=int, default=100, help="power-cut: checkpoint every N steps")
    ap.add_argument("--policies", default="RestartGang", help=f"power-cut: any of {','.join(POLICIES)}")
    ap.add_argument("--nodes", type=int, default=2, help="power-cut: the gang's nodes")
    ap.add_argument("--grace", default="20s", help="kube-controller-manager --node-monitor-grace-period")
    args = ap.parse_args()
    if args.trials is None:
        args.trials = 5 if args.mode == "power-cut" else 10
    state = ROOT / ".state" / "bench-node-failure"
    # room for the gang, a spare and the lost node's replacement
    c = LocalCluster(state, nodes=max(4, args.nodes + 2), node_monitor_grace_period=args.grace).up()
    with operator_on(c, NS):
        power_cut = args.mode == "power-cut"
        results = power_cut_mode(c, args) if power_cut else agent_only_mode(c, args)
        # agent-only keeps node_failure.json, which `make plots` draws
        name = "node_failure.json"
        if power_cut:  # the RestartGang-only history stays where it was; policy comparisons beside it
            name = (
                "node_failure_power_cut.json"
                if args.policies == "RestartGang"
                else "node_failure_policies.json"
            )
        out = ROOT / "bench" / "results" / name
        out.parent.mkdir(exist_ok=True)
        meta = {
            "command": "bench/node_failure.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores",
            "node_monitor_grace_period_s": float(args.grace.rstrip("s")),
            "kwok_lease_duration_s": 10,
        }
        out.write_text(json.dumps({**meta, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
