"""TrainingJob → the objects it runs as: one Pod per node rank, a headless Service, a NetworkPolicy,
and the trainer's ServiceAccount + Role. Pure functions: no I/O, unit-tested without a cluster."""

from __future__ import annotations

from typing import Any

from ..api.trainingjob import TrainingJobSpec
from .common import (
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_RANK,
    LABEL_REPLACEMENT,
    Owner,
    container_security_context,
    merge_env,
    metadata,
    pod_security_context,
)
from .torchrun import hostname, service_name, torchrun_command, torchrun_env

CHECKPOINT_MOUNT = "/checkpoints"
BACKUP_MOUNT = "/checkpoint-backup"  # spec.checkpoint.backup, read-write: rank 0 copies checkpoints there
KEY_MOUNT = "/var/run/aidc/keys"
KEK_MOUNT = "/var/run/aidc/kek"
METRICS_PORT = 9400
GPU = "nvidia.com/gpu"
# Variables the operator owns: a user value for these would break the gang's wiring, so ours win.
RESERVED_ENV_PREFIXES = ("PET_", "MASTER_", "AIDC_")
RESERVED_ENV = {"WORLD_SIZE", "RANK"}
TERMINATION_LOG = "/dev/termination-log"  # the kubelet's default terminationMessagePath


def pod_name(job: str, attempt: int, rank: int, replacement: int = 0) -> str:
    """replacement k > 0: the k-th pod that took the rank over within the attempt (ReplaceNode)."""
    return f"{job}-a{attempt}-{rank}" + (f"-r{replacement}" if replacement else "")


def key_secret_name(owner: Owner, spec: TrainingJobSpec) -> str | None:
    enc = spec.checkpoint.encryption
    if not enc.enabled:
        return None
    return enc.key_secret_ref.name if enc.key_secret_ref else f"{owner.name}-ckpt-key"


def trainer_service_account(job: str) -> str:
    return f"{job}-trainer"


def gpus(spec: TrainingJobSpec) -> int:
    return spec.proc_per_node if spec.gpus_per_node is None else spec.gpus_per_node


def aidc_env(owner: Owner, spec: TrainingJobSpec, attempt: int) -> list[dict[str, Any]]:
    ckpt = spec.checkpoint
    env: list[dict[str, Any]] = [
        {"name": "AIDC_JOB_NAME", "value": owner.name},
        {"name": "AIDC_ATTEMPT", "value": str(attempt)},
        {"name": "AIDC_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "AIDC_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "AIDC_CHECKPOINT_DIR", "value": f"{CHECKPOINT_MOUNT}/{owner.name}"},
        {"name": "AIDC_CHECKPOINT_KEEP", "value": str(ckpt.keep)},
        {"name": "AIDC_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "AIDC_ON_NO_VALID_CHECKPOINT", "value": ckpt.on_no_valid_checkpoint},
        # Workers append their structured exit report (cause, rank, peer) to the container's
        # termination message: the restart policy reads causes there, not in log text.
        {"name": "AIDC_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    if ckpt.backup is not None:
        env.append({"name": "AIDC_CHECKPOINT_BACKUP_DIR", "value": f"{BACKUP_MOUNT}/{owner.name}"})
        keep = ckpt.keep if ckpt.backup.keep is None else ckpt.backup.keep
        env.append({"name": "AIDC_CHECKPOINT_BACKUP_KEEP", "value": str(keep)})
    if ckpt.every_steps:
        env.append({"name": "AIDC_CHECKPOINT_EVERY_STEPS", "value": str(ckpt.every_steps)})
    if ckpt.every_seconds:
        env.append({"name": "AIDC_CHECKPOINT_EVERY_SECONDS", "value": str(ckpt.every_seconds)})
    if key_secret_name(owner, spec):
        env.append({"name": "AIDC_KEY_DIR", "value": KEY_MOUNT})
    if spec.checkpoint.encryption.enabled and spec.checkpoint.encryption.kek_secret_ref:
        env.append({"name": "AIDC_KEK_FILE", "value": f"{KEK_MOUNT}/kek"})
    return env


def _user_env(env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        v for v in env if v["name"] not in RESERVED_ENV and not v["name"].startswith(RESERVED_ENV_PREFIXES)
    ]


def volumes(owner: Owner, spec: TrainingJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): shared memory for NCCL/dataloaders, a writable /tmp under a read-only root,
    the checkpoint volume (and its backup's) and the key Secrets (read-only files, owner-only mode)."""
    ckpt_source = spec.checkpoint.volume or {"emptyDir": {}}
    vols = [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "tmp", "emptyDir": {}},
        {**ckpt_source, "name": "checkpoints"},
    ]
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
    ]
    if spec.checkpoint.backup is not None:
        vols.append({**spec.checkpoint.backup.volume, "name": "checkpoint-backup"})
        mounts.append({"name": "checkpoint-backup", "mountPath": BACKUP_MOUNT})
    key_secret = key_secret_name(owner, spec)
    if key_secret:
        vols.append({"name": "ckpt-key", "secret": {"secretName": key_secret, "defaultMode": 0o440}})
        mounts.append({"name": "ckpt-key", "mountPath": KEY_MOUNT, "readOnly": True})
        kek = spec.checkpoint.encryption.kek_secret_ref
        if kek:
            vols.append(
                {
                    "name": "ckpt-kek",
                    "secret": {
                        "secretName": kek.name,
                        "defaultMode": 0o440,
                        "items": [{"key": "kek", "path": "kek"}],
                    },
                }
            )
            mounts.append({"name": "ckpt-kek", "mountPath": KEK_MOUNT, "readOnly": True})
    tmpl = spec.pod_template
    return vols + list(tmpl.volumes), mounts + list(tmpl.volume_mounts)


def affinity(owner: Owner, spec: TrainingJobSpec, excluded_nodes: list[str]) -> dict[str, Any]:
    """One pod per node (required anti-affinity within the job), off the nodes that failed the job until
    they are Ready again, plus whatever affinity the user gave."""
    user = dict(spec.pod_template.affinity or {})
    anti = dict(user.get("podAntiAffinity") or {})
    anti["requiredDuringSchedulingIgnoredDuringExecution"] = [
        *anti.get("requiredDuringSchedulingIgnoredDuringExecution", []),
        {"labelSelector": {"matchLabels": {LABEL_JOB: owner.name}}, "topologyKey": "kubernetes.io/hostname"},
    ]
    result = {**user, "podAntiAffinity": anti}
    if excluded_nodes:
        node_aff = dict(user.get("nodeAffinity") or {})
        required = dict(node_aff.get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        avoid = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": sorted(excluded_nodes)}
        # nodeSelectorTerms are ORed, so the exclusion must be ANDed into every term.
        terms = required.get("nodeSelectorTerms") or [{}]
        required["nodeSelectorTerms"] = [
            {**t, "matchExpressions": [*t.get("matchExpressions", []), avoid]} for t in terms
        ]
        node_aff["requiredDuringSchedulingIgnoredDuringExecution"] = required
        result["nodeAffinity"] = node_aff
    return result


def resources(spec: TrainingJobSpec) -> dict[str, Any]:
    res = {k: dict(v) for k, v in (spec.resources or {}).items()}
    n = gpus(spec)
    if n:
        res.setdefault("limits", {})[GPU] = str(n)
        res.setdefault("requests", {})[GPU] = str(n)
    return res


def pod(
    owner: Owner,
    spec: TrainingJobSpec,
    rank: int,
    attempt: int,
    excluded_nodes: list[str] | None = None,
    placement: tuple[dict[str, str], list[dict[str, Any]]] | None = None,
    replacement: int = 0,
) -> dict[str, Any]:
    """Rank `rank` of attempt `attempt`. placement: (node labels, tolerations) of the flavor Kueue
    admitted the gang to, added to the user's own; replacement: see pod_name (same hostname, so the
    rank's DNS name moves to it)."""
    tmpl = spec.pod_template
    # Kueue's labels stay on the TrainingJob: its Workload queues the gang as one (queueing.py).
    labels = {
        **tmpl.labels,
        LABEL_JOB: owner.name,
        LABEL_RANK: str(rank),
        LABEL_ATTEMPT: str(attempt),
    }
    if replacement:
        labels[LABEL_REPLACEMENT] = str(replacement)
    vols, mounts = volumes(owner, spec)
    container = {
        "name": "trainer",
        "image": spec.image,
        "command": torchrun_command(spec.command),
        "env": merge_env(
            _user_env(list(spec.env)),
            _user_env(list(tmpl.env)),
            torchrun_env(owner, spec, rank, attempt),
            aidc_env(owner, spec, attempt),
        ),
        "ports": [
            {"name": "rendezvous", "containerPort": spec.master_port},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": resources(spec),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # The message the restart policy puts in a Failed condition comes from here.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    grace = tmpl.termination_grace_period_seconds
    pod_spec: dict[str, Any] = {
        # the operator decides every restart: of the gang, or (ReplaceNode) a new pod for a lost one
        "restartPolicy": "Never",
        "hostname": hostname(owner.name, rank),
        "subdomain": service_name(owner.name),
        "serviceAccountName": tmpl.service_account_name or trainer_service_account(owner.name),
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": vols,
        "affinity": affinity(owner, spec, excluded_nodes or []),
        "enableServiceLinks": False,
        # time to agree on the stop, finish the in-flight save and write a final checkpoint
        "terminationGracePeriodSeconds": 60 if grace is None else grace,
    }
    if tmpl.node_selector:
        pod_spec["nodeSelector"] = dict(tmpl.node_selector)
    if gpus(spec):
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule; a GPU job belongs there.
        pod_spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    if tmpl.tolerations:
        pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *tmpl.tolerations]
    if placement is not None:
        labels_, tolerations = placement
        if labels_:
            pod_spec["nodeSelector"] = {**pod_spec.get("nodeSelector", {}), **labels_}
        if tolerations:
            pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *tolerations]
    if tmpl.priority_class_name:
        pod_spec["priorityClassName"] = tmpl.priority_class_name
    if tmpl.image_pull_secrets:
        pod_spec["imagePullSecrets"] = list(tmpl.image_pull_secrets)
    meta = metadata(owner, pod_name(owner.name, attempt, rank, replacement), labels)
    if tmpl.annotations:
        meta["annotations"] = dict(tmpl.annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def gang(
    owner: Owner,
    spec: TrainingJobSpec,
    attempt: int,
    excluded_nodes: list[str] | None = None,
    nodes: int | None = None,
) -> list[dict[str, Any]]:
    """All pods of one attempt (nodes: how many, for an elastic job running smaller)."""
    return [pod(owner, spec, r, attempt, excluded_nodes) for r in range(nodes or spec.nodes)]


def headless_service(owner: Owner, spec: TrainingJobSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, service_name(owner.name), {LABEL_JOB: owner.name}),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB: owner.name},
            # Rendezvous happens before any pod is Ready: DNS must resolve not-ready pods.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": spec.master_port, "targetPort": spec.master_port}],
        },
    }


def network_policy(owner: Owner, spec: TrainingJobSpec) -> dict[str, Any]:
    """Only the job's own pods may reach its pods (rendezvous, NCCL/gloo use arbitrary ports); metrics
    scraping is allowed on the metrics port from anywhere in the cluster."""
    job_pods = {"podSelector": {"matchLabels": {LABEL_JOB: owner.name}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, f"{owner.name}-gang", {LABEL_JOB: owner.name}),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB: owner.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [job_pods]},
                {"ports": [{"protocol": "TCP", "port": METRICS_PORT}]},
            ],
        },
    }


def trainer_rbac(owner: Owner, pod_names: list[str]) -> list[dict[str, Any]]:
    """ServiceAccount + Role + RoleBinding letting the trainer patch (only) its own gang's pods, which is
    how rank 0 reports progress (docs/contracts.md)."""
    sa = trainer_service_account(owner.name)
    labels = {LABEL_JOB: owner.name}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(owner, sa, labels)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(owner, sa, labels),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["pods"],
                    "verbs": ["get", "patch"],
                    "resourceNames": sorted(pod_names),
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(owner, sa, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": owner.namespace}],
        },
    ]
