"""TrainingJob: a gang of torchrun pods with checkpoints, restarts and node-failure recovery."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from .base import ApiModel, Condition, KubeList, KubeObject, PodTemplateOverrides, SecretRef

DEFAULT_TRAINER_IMAGE = "ghcr.io/aidc-dev/aidc-trainer:0.1.0"
DEFAULT_COMMAND = ("python", "-m", "aidc_trainer", "--example", "mlp")
DURATION = r"^([0-9]+(ns|us|ms|s|m|h))+$"


class ElasticPolicy(ApiModel):
    """Elastic training with torchrun's c10d rendezvous: the gang may run with fewer nodes than asked."""

    min_nodes: int = Field(ge=1, le=1024)
    """Fewest nodes the job may run with."""
    max_nodes: int = Field(ge=1, le=1024)
    """Most nodes the job may run with."""
    max_restarts: int = Field(default=3, ge=0, le=1000)
    """torchrun --max-restarts: in-place worker restarts before the pod fails."""


class EncryptionSpec(ApiModel):
    """AES-256-GCM encryption of checkpoints at rest, with a per-job key in a Secret."""

    enabled: bool = True
    """Encrypt checkpoints."""
    key_secret_ref: SecretRef | None = None
    """Use this existing key Secret instead of one the operator creates (it is validated, never changed)."""
    kek_secret_ref: SecretRef | None = None
    """Key-encryption key Secret (key 'kek', 32 bytes): the data key is stored wrapped by it."""
    rotate_after: str | None = Field(default=None, pattern=DURATION)
    """Rotate the data key this long after it was created (Go duration, e.g. 720h)."""
    key_retention: Literal["Retain", "Delete"] = "Retain"
    """What happens to the key Secret when the job is deleted. Retain keeps checkpoints readable."""


class BackupSpec(ApiModel):
    """A second volume to which rank 0 copies every published checkpoint (bytes as stored, so still
    encrypted), verifies the copy against the manifest and keeps the newest N. Resume falls back to it when
    the checkpoint volume has no checkpoint that verifies."""

    volume: KubeObject
    """A Volume source mounted read-write at /checkpoint-backup, in practice a persistentVolumeClaim (on
    other storage than spec.checkpoint.volume's claim); an emptyDir would not outlive the pod."""
    keep: int | None = Field(default=None, ge=1, le=1000)
    """Copies to keep on the backup volume. Default: spec.checkpoint.keep."""


class CheckpointSpec(ApiModel):
    """Where and how often the trainer checkpoints."""

    volume: KubeObject | None = None
    """A Volume source (persistentVolumeClaim, nfs, emptyDir …) mounted at /checkpoints.
    Without one the job gets an emptyDir, which does not survive a gang restart."""
    every_steps: int | None = Field(default=None, ge=1)
    """Save every N optimizer steps."""
    every_seconds: int | None = Field(default=None, ge=1)
    """Save at least every N seconds. Default: 600 when everySteps is not set either."""
    keep: int = Field(default=3, ge=1, le=1000)
    """Checkpoints to keep; older ones are pruned."""
    encryption: EncryptionSpec = Field(default_factory=EncryptionSpec)
    """Encryption at rest."""
    on_no_valid_checkpoint: Literal["Fail", "StartFresh"] = "Fail"
    """When checkpoints exist but none verifies: Fail (the trainer refuses to start and touches nothing;
    condition NoValidCheckpoint names the files) or StartFresh (the damaged checkpoints are moved aside,
    never deleted, and training starts from step 0)."""
    backup: BackupSpec | None = None
    """Backup copies of each checkpoint on a second volume (same cluster; needs spec.checkpoint.volume).
    Default: none."""


class FailurePolicy(ApiModel):
    """How the job reacts to failed pods and lost nodes."""

    max_restarts: int = Field(default=3, ge=0, le=10000)
    """Gang restarts allowed for retryable pod failures before the job fails."""
    backoff_seconds: int = Field(default=10, ge=0, le=86400)
    """First delay before a restart; doubles with every restart."""
    max_backoff_seconds: int = Field(default=300, ge=0, le=86400)
    """Cap on the restart delay."""
    node_failure: Literal["RestartGang", "ReplaceNode", "Fail"] = "RestartGang"
    """What a lost node does. RestartGang: recreate the gang on healthy nodes. ReplaceNode: replace
    only the lost node's pod; the other pods keep running and their torchrun agents restart the workers
    in place (c10d rendezvous), resuming from the newest checkpoint; a lost rank 0, which hosts the
    rendezvous store, restarts the gang instead. Fail: fail the job."""
    max_node_failures: int = Field(default=10, ge=0, le=10000)
    """Recoveries allowed for node failures (a budget separate from maxRestarts)."""
    spare_nodes: int = Field(default=0, ge=0, le=64)
    """ReplaceNode only: extra pods kept scheduled and started as standby in the rendezvous (holding
    their GPUs): a lost node's rank is taken over at once, without waiting for scheduling or start-up,
    and a new spare is started behind it."""
    retryable_exit_codes: list[int] = Field(default_factory=list, max_length=64)
    """Exit codes that restart the gang besides signals (128+N) and OOM; any other non-zero code fails
    the job at once."""


class SchedulingPolicy(ApiModel):
    """All-or-nothing placement: a gang holds its GPUs only if every pod of it can be placed."""

    timeout_seconds: int = Field(default=300, ge=0, le=86400)
    """If not every pod of an attempt is scheduled within this, the partial gang is deleted (releasing
    its GPUs) and tried again after backoffSeconds. 0: wait for the scheduler forever."""
    backoff_seconds: int = Field(default=30, ge=0, le=86400)
    """Delay before a gang that timed out is tried again."""
    max_retries: int | None = Field(default=None, ge=0, le=100000)
    """Scheduling timeouts allowed before the job fails (a budget of its own, not maxRestarts); unset:
    keep trying."""


class TrainingJobSpec(ApiModel):
    """Desired state of a TrainingJob."""

    image: str = Field(default=DEFAULT_TRAINER_IMAGE, min_length=1)
    """Container image with aidc (or the user's own torch code) installed."""
    command: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COMMAND),
        min_length=1,
        json_schema_extra={"default": list(DEFAULT_COMMAND)},
    )
    """What torchrun runs: a python module invocation (python -m pkg …) or a script path with arguments."""
    nodes: int = Field(default=1, ge=1, le=1024)
    """Pods in the gang (one per node). Changing it on a running job is a resize: a static gang takes the
    new size at its next start (condition ResizePending until then); an elastic gang grows or shrinks in
    place within [minNodes, maxNodes]."""
    proc_per_node: int = Field(default=1, ge=1, le=64)
    """torchrun --nproc-per-node: worker processes per pod."""
    gpus_per_node: int | None = Field(default=None, ge=0, le=64)
    """nvidia.com/gpu per pod; defaults to procPerNode. 0 runs on CPU."""
    elastic: ElasticPolicy | None = None
    """Elastic rendezvous; nodes must lie within [minNodes, maxNodes]."""
    resources: KubeObject = Field(default_factory=dict)
    """Container resources (requests/limits) per pod; the GPU limit is set from gpusPerNode."""
    env: KubeList = Field(default_factory=list)
    """Extra environment variables for the trainer container."""
    master_port: int = Field(default=29500, ge=1024, le=65535)
    """torch.distributed rendezvous port on the rank-0 pod."""
    pod_template: PodTemplateOverrides = Field(default_factory=PodTemplateOverrides)
    """Scheduling and pod-level overrides."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpointing."""
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy)
    """Restarts and node failures."""
    suspend: bool = False
    """Suspended jobs have no pods; status is kept and resuming recreates the gang."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the job this long after it succeeded or failed."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the job if it takes longer than this, counted from when its first gang was created (Pending
    included, as for a batch/v1 Job)."""
    scheduling: SchedulingPolicy = Field(default_factory=SchedulingPolicy)
    """All-or-nothing gang placement when no queueing system admits the job."""
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    """Pods deleted when the job finishes: None, the ones still running, or all."""


class CheckpointRef(ApiModel):
    """A checkpoint the trainer reported."""

    model_config = ConfigDict(extra="ignore")  # the trainer may report more than we keep

    step: int
    """Optimizer step."""
    path: str = ""
    """Directory of the checkpoint inside the checkpoint volume."""
    time: str | None = None
    """When it was written (RFC 3339)."""
    key_ids: list[str] | None = None
    """Key ids the checkpoints still on the volume were written with (the others are pruned from the
    key Secret)."""


class BackupRef(ApiModel):
    """The newest checkpoint copy the trainer reported on the backup volume."""

    model_config = ConfigDict(extra="ignore")  # the trainer may report more than we keep

    step: int
    """Optimizer step of the copied checkpoint."""
    path: str = ""
    """Directory of the copy inside the backup volume."""
    time: str | None = None
    """When the copy was verified and in place (RFC 3339)."""


class Progress(ApiModel):
    """Training progress reported by rank 0."""

    model_config = ConfigDict(extra="ignore")  # the trainer may report more than we keep

    step: int = 0
    """Current step."""
    total_steps: int | None = None
    """Steps the run will take, if known."""
    time: str | None = None
    """When reported (RFC 3339)."""
    steps_per_second: float | None = None
    """Recent training rate the trainer measured."""
    eta: str | None = None
    """Training time left as of the report, e.g. 4m10s (from stepsPerSecond and the steps left); absent
    when unknown or finished."""
    estimated_completion_time: str | None = None
    """When training should end at the reported rate (RFC 3339)."""


class Evaluation(ApiModel):
    """The latest held-out evaluation rank 0 reported."""

    model_config = ConfigDict(extra="ignore")  # the trainer may report more than we keep

    step: int | None = None
    """Step the model was evaluated at."""
    loss: float | None = None
    """Held-out loss."""
    accuracy: float | None = None
    """Held-out accuracy (0..1)."""
    f1: float | None = None
    """Held-out macro-F1 (0..1)."""


class RecoveryRecord(ApiModel):
    """One recovery from a lost node, as the operator handled it and the trainer resumed."""

    node: str | None = None
    """The node that was lost."""
    lost_pod: str
    """The pod the node took."""
    replacement: str | None = None
    """ReplaceNode: the pod created in its place (the other pods kept running); absent for a gang
    restart."""
    mode: Literal["ReplaceNode", "RestartGang"]
    """How the operator recovered."""
    lost_at: str | None = None
    """The node's last sign of life the operator saw (its Lease renewal), RFC 3339."""
    detected_at: str
    """When the operator judged the node lost (RFC 3339)."""
    resumed_at: str | None = None
    """When the first training step after the recovery ran (the trainer's report), RFC 3339."""
    resumed_from_step: int | None = None
    """The checkpoint step training resumed from."""
    seconds: float | None = None
    """detectedAt → resumedAt; 0 when a spare had already taken over before the operator's verdict."""


class FailureRecord(ApiModel):
    """The last failure that restarted or failed the job."""

    reason: str
    """NodeFailure, PodFailed, OOMKilled, DeadlineExceeded …"""
    message: str = ""
    """What happened, with the exit code and container message where known."""
    node: str | None = None
    """Node involved, if any."""
    time: str | None = None
    """When it was seen (RFC 3339)."""


Phase = Literal["Queued", "Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]


class TrainingJobStatus(ApiModel):
    """Observed state of a TrainingJob; written only by the operator."""

    model_config = ConfigDict(extra="ignore")  # tolerate fields a newer operator wrote

    phase: Phase | None = None
    """Pending, Running, Restarting, Succeeded, Failed or Suspended."""
    conditions: list[Condition] = Field(default_factory=list)
    """Created, Running, Restarting, Succeeded, Failed, Suspended, Invalid, CheckpointKeyReady …"""
    observed_generation: int | None = None
    """metadata.generation the status reflects."""
    attempt: int = 0
    """Current gang attempt (pods carry it as aidc.dev/attempt)."""
    restarts: int = 0
    """Gang restarts for pod failures."""
    node_failures: int = 0
    """Recoveries from lost nodes (gang restarts or, with ReplaceNode, pod replacements)."""
    spares: int = 0
    """Running pods beyond spec.nodes: standby ranks of spec.failurePolicy.spareNodes."""
    recoveries: list[RecoveryRecord] = Field(default_factory=list)
    """The latest recoveries from lost nodes (at most 10, oldest first)."""
    preemptions: int = 0
    """Gang restarts because the scheduler preempted a pod (neither a failure nor a restart)."""
    scheduling_retries: int = 0
    """Partial gangs deleted because not every pod was scheduled within spec.scheduling.timeoutSeconds."""
    ready_nodes: int = 0
    """Pods of the current attempt that are Running and Ready."""
    nodes: str | None = None
    """For kubectl get: ready/total pods while the job runs; once it finished, pods that exited 0/total
    (like a Job's completions)."""
    last_checkpoint: CheckpointRef | None = None
    """Newest checkpoint the trainer reported."""
    last_backup: BackupRef | None = None
    """Newest checkpoint copied to spec.checkpoint.backup and verified there."""
    progress: Progress | None = None
    """Training progress."""
    start_time: str | None = None
    """When the job's first gang was created (activeDeadlineSeconds counts from here)."""
    completion_time: str | None = None
    """When the job succeeded or failed."""
    restart_after: str | None = None
    """While Restarting: when the next attempt may start (backoff)."""
    gpu_seconds: float = 0
    """GPU-seconds consumed by pods of this job."""
    gpu_seconds_previous: float = 0
    """GPU-seconds of attempts that have ended (gpuSeconds adds the running attempt's)."""
    energy_joules: float | None = None
    """GPU energy of all GPUs of all ranks, summed over attempts, as the trainer last reported it (NVML);
    absent while nothing was measured (see energy)."""
    energy_joules_previous: float | None = None
    """Energy of attempts that have ended (energyJoules adds the running attempt's); absent: none measured."""
    energy: str | None = None
    """How the running attempt's energy is measured: 'NVML on N GPU(s)', or 'not measured: <reason>' (e.g.
    CPU-only nodes, no NVML), never a 0 that looks like a measurement."""
    evaluation: Evaluation | None = None
    """Latest held-out evaluation (accuracy, f1, loss, step)."""
    last_failure: FailureRecord | None = None
    """What caused the last restart or the failure."""
    excluded_nodes: list[str] = Field(default_factory=list)
    """Nodes the gang avoids until they are Ready again."""
    current_key_id: str | None = None
    """Key id new checkpoints are encrypted with."""
    peer_lost_since: str | None = None
    """When a rank's exit that signals a lost peer was first seen: the exit is classified only once the
    gang's nodes are judged (a Lease renewed since, or lapsed), at most a Lease duration later."""
