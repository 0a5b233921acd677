"""TrainingJob → Pods/Service/NetworkPolicy/RBAC: what the operator renders, without a cluster."""

from __future__ import annotations

from aidc_operator.api.trainingjob import TrainingJobSpec
from aidc_operator.builders import trainingjob as build
from aidc_operator.builders.common import LABEL_ATTEMPT, LABEL_JOB, LABEL_RANK, Owner

OWNER = Owner("TrainingJob", "mnist", "team-a", "uid-123", {"kueue.x-k8s.io/queue-name": "gpu-queue"})


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def spec(**kw) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(kw)


def test_gang_has_one_pod_per_rank_with_stable_dns_identity() -> None:
    pods = build.gang(OWNER, spec(nodes=3, procPerNode=8), attempt=2)
    assert [p["metadata"]["name"] for p in pods] == ["mnist-a2-0", "mnist-a2-1", "mnist-a2-2"]
    for rank, pod in enumerate(pods):
        assert pod["spec"]["hostname"] == f"mnist-{rank}"
        assert pod["spec"]["subdomain"] == "mnist-ranks"
        labels = pod["metadata"]["labels"]
        assert labels[LABEL_JOB] == "mnist"
        assert labels[LABEL_RANK] == str(rank)
        assert labels[LABEL_ATTEMPT] == "2"
        assert "kueue.x-k8s.io/queue-name" not in labels, "the Workload queues the gang, not each pod"
        ref = pod["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("TrainingJob", "uid-123", True)
        assert pod["spec"]["restartPolicy"] == "Never"


def test_torchrun_env_matches_kubeflow_meaning() -> None:
    pod = build.pod(OWNER, spec(nodes=4, procPerNode=8, masterPort=23456), rank=2, attempt=0)
    env = env_of(pod)
    master = "mnist-0.mnist-ranks.team-a.svc"
    assert env["MASTER_ADDR"] == master and env["PET_MASTER_ADDR"] == master
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "23456"
    assert env["WORLD_SIZE"] == "4" and env["RANK"] == "2"  # pods and node rank, as in PyTorchJob
    assert env["PET_NNODES"] == "4" and env["PET_NODE_RANK"] == "2" and env["PET_NPROC_PER_NODE"] == "8"
    assert env["AIDC_CHECKPOINT_DIR"] == "/checkpoints/mnist"
    assert env["AIDC_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "PET_RDZV_BACKEND" not in env


def test_elastic_job_uses_c10d_rendezvous() -> None:
    s = spec(nodes=4, elastic={"minNodes": 2, "maxNodes": 4, "maxRestarts": 5})
    env = env_of(build.pod(OWNER, s, rank=0, attempt=3))
    assert env["PET_NNODES"] == "2:4"
    assert env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ENDPOINT"] == "mnist-0.mnist-ranks.team-a.svc:29500"
    assert env["PET_RDZV_ID"] == "uid-123-3"
    assert env["PET_MAX_RESTARTS"] == "5"
    assert "PET_NODE_RANK" not in env


def test_user_env_cannot_break_the_wiring_but_is_kept() -> None:
    s = spec(env=[{"name": "MASTER_ADDR", "value": "evil"}, {"name": "NCCL_DEBUG", "value": "INFO"}])
    env = env_of(build.pod(OWNER, s, 0, 0))
    assert env["MASTER_ADDR"] == "mnist-0.mnist-ranks.team-a.svc"
    assert env["NCCL_DEBUG"] == "INFO"


def test_gpu_limits_default_to_proc_per_node_and_can_be_zero() -> None:
    res = build.pod(OWNER, spec(procPerNode=4), 0, 0)["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "4" and res["requests"]["nvidia.com/gpu"] == "4"
    cpu = build.pod(OWNER, spec(procPerNode=4, gpusPerNode=0, resources={"limits": {"cpu": "2"}}), 0, 0)
    res = cpu["spec"]["containers"][0]["resources"]
    assert res == {"limits": {"cpu": "2"}}
    assert "tolerations" not in cpu["spec"]


def test_torchrun_command_translation() -> None:
    assert build.torchrun_command(["python", "-m", "aidc_trainer", "--steps", "5"]) == [
        "torchrun",
        "-m",
        "aidc_trainer",
        "--steps",
        "5",
    ]
    assert build.torchrun_command(["python3", "train.py", "--lr", "1"]) == [
        "torchrun",
        "train.py",
        "--lr",
        "1",
    ]
    assert build.torchrun_command(["/bin/my-trainer", "x"]) == [
        "torchrun",
        "--no-python",
        "/bin/my-trainer",
        "x",
    ]


def test_volumes_shm_checkpoint_and_read_only_key() -> None:
    s = spec(
        checkpoint={
            "volume": {"persistentVolumeClaim": {"claimName": "ckpt"}},
            "encryption": {"kekSecretRef": {"name": "kek"}},
        }
    )
    pod = build.pod(OWNER, s, 0, 0)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"]["mountPath"] == "/dev/shm"
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "ckpt"
    assert vols["ckpt-key"]["secret"]["secretName"] == "mnist-ckpt-key"
    assert mounts["ckpt-key"]["readOnly"] is True and mounts["ckpt-kek"]["readOnly"] is True
    env = env_of(pod)
    assert env["AIDC_KEY_DIR"] == "/var/run/aidc/keys" and env["AIDC_KEK_FILE"] == "/var/run/aidc/kek/kek"
    # Key material is mounted as files, never put in the environment.
    assert not any("secretKeyRef" in str(v) for v in env.values())


def test_unencrypted_job_mounts_no_key() -> None:
    pod = build.pod(OWNER, spec(checkpoint={"encryption": {"enabled": False}}), 0, 0)
    assert "ckpt-key" not in {v["name"] for v in pod["spec"]["volumes"]}
    assert "AIDC_KEY_DIR" not in env_of(pod)


def test_pods_are_hardened() -> None:
    pod = build.pod(OWNER, spec(), 0, 0)
    psc = pod["spec"]["securityContext"]
    csc = pod["spec"]["containers"][0]["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]


def test_scheduling_overrides_merge_predictably() -> None:
    s = spec(
        podTemplate={
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "priorityClassName": "high",
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                        ]
                    }
                }
            },
            "labels": {"team": "vision"},
            "terminationGracePeriodSeconds": 300,
        }
    )
    pod = build.pod(OWNER, s, 1, 0, excluded_nodes=["bad-node"])
    ps = pod["spec"]
    # slow steps or a large final checkpoint need longer than the default 60 s after SIGTERM
    assert ps["terminationGracePeriodSeconds"] == 300
    assert build.pod(OWNER, spec(), 1, 0)["spec"]["terminationGracePeriodSeconds"] == 60
    assert ps["nodeSelector"] == {"pool": "h100"}
    assert ps["priorityClassName"] == "high"
    assert {"key": "dedicated", "operator": "Exists"} in ps["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in ps["tolerations"]
    term = ps["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]
    assert {"key": "zone", "operator": "In", "values": ["a"]} in term["matchExpressions"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["bad-node"]} in term[
        "matchExpressions"
    ]
    anti = ps["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["labelSelector"]["matchLabels"] == {LABEL_JOB: "mnist"}
    assert pod["metadata"]["labels"]["team"] == "vision"


def test_headless_service_publishes_not_ready_pods() -> None:
    svc = build.headless_service(OWNER, spec(masterPort=29501))
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {LABEL_JOB: "mnist"}
    assert svc["spec"]["ports"][0]["port"] == 29501


def test_network_policy_admits_only_the_gang() -> None:
    np = build.network_policy(OWNER, spec())
    assert np["spec"]["podSelector"]["matchLabels"] == {LABEL_JOB: "mnist"}
    assert np["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {LABEL_JOB: "mnist"}}}]


def test_trainer_role_lets_it_patch_only_its_own_pods() -> None:
    sa, role, binding = build.trainer_rbac(OWNER, ["mnist-a0-1", "mnist-a0-0"])
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["pods"],
            "verbs": ["get", "patch"],
            "resourceNames": ["mnist-a0-0", "mnist-a0-1"],
        }
    ]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"] == "mnist-trainer"
