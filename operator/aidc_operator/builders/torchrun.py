"""How a TrainingJob's pods find each other: stable DNS names and torchrun's rendezvous wiring. Pure.

Two rendezvous designs, chosen by what the job must survive in place:
- static (the default, Kubeflow's PyTorchJob wiring): fixed node ranks and a master address; any lost
  pod means a new gang.
- c10d (elastic jobs and failurePolicy.nodeFailure: ReplaceNode): the torchrun agents meet in a TCP
  store hosted by the agent of the rank-0 pod; when a pod is lost, the survivors' agents restart their
  workers and wait in the store for a replacement (or a standby spare) to join; the run id is the
  attempt's, so a replacement pod of the same attempt joins the same rendezvous. Losing the rank-0 pod
  loses the store, so that case restarts the gang (docs/failure-recovery.md).
"""

from __future__ import annotations

from typing import Any

from ..api.trainingjob import TrainingJobSpec
from .common import Owner

# Seconds without a heartbeat before the rendezvous drops a node (torch default: 3 beats of 5 s): what a
# spare waits before it takes over a lost rank. Heartbeats come from an agent thread, so 8 missed
# 1-second beats stays clear of a busy machine's scheduling hiccups.
DEAD_PEER_SECONDS = 8
KEEP_ALIVE = f"keep_alive_interval=1,keep_alive_max_attempt={DEAD_PEER_SECONDS}"


def service_name(job: str) -> str:
    # Not the job's bare name: that is left for what users address (an InferenceService serving this
    # job is typically given the same name, and its Service takes it).
    return f"{job}-ranks"


def hostname(job: str, rank: int) -> str:
    # Stable across attempts and replacements (only one pod of a rank is ever alive), so MASTER_ADDR and
    # the rendezvous endpoint never change.
    return f"{job}-{rank}"


def pod_dns(owner: Owner, rank: int) -> str:
    return f"{hostname(owner.name, rank)}.{service_name(owner.name)}.{owner.namespace}.svc"


def master_addr(owner: Owner) -> str:
    return pod_dns(owner, 0)


def rendezvous_in_place(spec: TrainingJobSpec) -> bool:
    """Do the pods meet in a c10d rendezvous that survives a pod's loss (elastic or ReplaceNode)?"""
    return spec.elastic is not None or spec.failure_policy.node_failure == "ReplaceNode"


def torchrun_command(command: list[str]) -> list[str]:
    """The user's command under torchrun: `python -m mod …` → `torchrun -m mod …`, `python x.py …` →
    `torchrun x.py …`, anything else → `torchrun --no-python cmd …`. torchrun takes its own options from
    the PET_* environment, so none appear here."""
    if command[0] in ("python", "python3") and len(command) > 1:
        if command[1] == "-m" and len(command) > 2:
            return ["torchrun", "-m", *command[2:]]
        if not command[1].startswith("-"):
            return ["torchrun", *command[1:]]
    return ["torchrun", "--no-python", *command]


def torchrun_env(owner: Owner, spec: TrainingJobSpec, rank: int, attempt: int) -> list[dict[str, Any]]:
    """torchrun's wiring, with WORLD_SIZE/RANK meaning what Kubeflow's PyTorchJob gives them: the number
    of pods and this pod's node rank (torchrun sets the per-process global values itself)."""
    master = master_addr(owner)
    port = str(spec.master_port)
    env = {
        "MASTER_ADDR": master,
        "MASTER_PORT": port,
        "WORLD_SIZE": str(spec.nodes),
        "RANK": str(rank),
        "PET_NPROC_PER_NODE": str(spec.proc_per_node),
    }
    if not rendezvous_in_place(spec):
        env |= {
            "PET_NNODES": str(spec.nodes),
            "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": master,
            "PET_MASTER_PORT": port,
        }
        return [{"name": k, "value": v} for k, v in env.items()]
    if spec.elastic:
        nnodes, restarts = f"{spec.elastic.min_nodes}:{spec.elastic.max_nodes}", spec.elastic.max_restarts
    else:
        # A fixed size: a spare beyond it waits in the rendezvous' redundancy list until a rank is lost.
        # Every loss restarts each survivor's workers once: the node-failure budget is the agents' too.
        nnodes, restarts = f"{spec.nodes}:{spec.nodes}", spec.failure_policy.max_node_failures
    env |= {
        "PET_NNODES": nnodes,
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": f"{master}:{port}",
        "PET_RDZV_ID": f"{owner.uid}-{attempt}",
        "PET_MAX_RESTARTS": str(restarts),
        # Said, not guessed: torch decides who hosts the store by matching the endpoint against the
        # machine's own names, which pods behind a Service (or sharing a host) cannot answer.
        "PET_RDZV_CONF": f"is_host={1 if rank == 0 else 0},{KEEP_ALIVE}",
        # The address the rendezvous' rank 0 gives its peers as the workers' master: the pod's own DNS
        # name (the default, the host's FQDN, is not a pod's address everywhere).
        "PET_LOCAL_ADDR": pod_dns(owner, rank),
        # torch 2.15 keeps rank 0's bootstrap address from the first round and never publishes it again,
        # so an agent joining a later round (a replacement, a spare, an elastic pod added in place)
        # waits for it forever; a store per round publishes it every time.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    return [{"name": k, "value": v} for k, v in env.items()]
