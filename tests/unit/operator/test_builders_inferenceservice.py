"""InferenceService → Deployment/Service/HPA: what the operator renders, without a cluster."""

from __future__ import annotations

import pytest

from aidc_operator.api.inferenceservice import InferenceServiceSpec
from aidc_operator.builders import inferenceservice as build
from aidc_operator.builders.common import LABEL_ISVC, LABEL_ROLE, Owner

OWNER = Owner("InferenceService", "mnist", "team-a", "uid-9")
PVC = {"persistentVolumeClaim": {"claimName": "ckpt"}}


def spec(**kw) -> InferenceServiceSpec:
    kw.setdefault("model", {"fromTrainingJob": "mnist-ddp"})
    return InferenceServiceSpec.model_validate(kw)


def training_job(name: str = "mnist-ddp", **checkpoint) -> dict:
    checkpoint.setdefault("volume", PVC)
    return {
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": "tj-uid"},
        "spec": {"checkpoint": checkpoint},
    }


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def env_of(dep: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(dep)["env"]}


def mounts_of(dep: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container(dep)["volumeMounts"]}


def volumes_of(dep: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}


def test_from_training_job_mounts_its_checkpoints_and_key_read_only() -> None:
    resolved = build.resolve_training_job(training_job(encryption={"kekSecretRef": {"name": "kek"}}))
    dep = build.deployment(OWNER, spec(), build.PRIMARY, resolved)
    env = env_of(dep)
    assert env["AIDC_CHECKPOINT_DIR"] == "/checkpoints/mnist-ddp"
    assert env["AIDC_KEY_DIR"] == "/var/run/aidc/keys"
    assert env["AIDC_KEK_FILE"] == "/var/run/aidc/kek/kek"
    mounts, vols = mounts_of(dep), volumes_of(dep)
    assert mounts["/checkpoints"]["readOnly"] is True
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "ckpt"}
    # The key Secret the TrainingJob builder creates for the job, as files, never env values.
    assert vols["model-key"]["secret"]["secretName"] == "mnist-ddp-ckpt-key"
    assert mounts["/var/run/aidc/keys"]["readOnly"] is True
    assert vols["model-kek"]["secret"]["secretName"] == "kek"
    assert not any("valueFrom" in e for e in container(dep)["env"])


def test_training_job_with_own_key_secret_or_no_encryption() -> None:
    own = build.resolve_training_job(training_job(encryption={"keySecretRef": {"name": "my-key"}}))
    assert own.key_secret == "my-key" and own.kek_secret is None
    plain = build.resolve_training_job(training_job(encryption={"enabled": False}))
    dep = build.deployment(OWNER, spec(), build.PRIMARY, plain)
    assert "AIDC_KEY_DIR" not in env_of(dep) and "model-key" not in volumes_of(dep)


def test_training_job_without_a_shared_volume_cannot_be_served() -> None:
    job = training_job()
    del job["spec"]["checkpoint"]["volume"]
    with pytest.raises(build.Unresolvable) as e:
        build.resolve_training_job(job)
    assert e.value.reason == "TrainingJobHasNoCheckpointVolume"


def test_storage_model_is_served_from_models_path() -> None:
    s = spec(model={"storage": {"volume": PVC, "path": "/runs/7/", "keySecretRef": {"name": "k"}}})
    dep = build.deployment(OWNER, s, build.PRIMARY, build.resolve_storage(s.model))
    assert env_of(dep)["AIDC_CHECKPOINT_DIR"] == "/models/runs/7"
    assert mounts_of(dep)["/models"]["readOnly"] is True
    assert volumes_of(dep)["model-key"]["secret"]["secretName"] == "k"


def test_server_settings_reach_the_server_environment() -> None:
    s = spec(
        model={"fromTrainingJob": "mnist-ddp", "name": "digits", "quantize": "int8", "watchSeconds": 5},
        batching={"maxBatchSize": 64, "maxLatencyMs": 2},
        port=9000,
        env=[{"name": "AIDC_LOG_LEVEL", "value": "debug"}, {"name": "AIDC_PORT", "value": "1"}],
    )
    env = env_of(build.deployment(OWNER, s, build.PRIMARY, build.resolve_training_job(training_job())))
    assert env["AIDC_MODEL_NAME"] == "digits"
    assert env["AIDC_MAX_BATCH_SIZE"] == "64" and env["AIDC_MAX_LATENCY_MS"] == "2"
    assert env["AIDC_QUANTIZE"] == "int8" and env["AIDC_WATCH_SECONDS"] == "5"
    assert env["AIDC_PORT"] == "9000"  # the wiring is ours; a user's AIDC_PORT cannot break the probes
    assert env["AIDC_LOG_LEVEL"] == "debug"  # server tuning is the user's


def test_pod_is_hardened_and_probed_on_v2_health() -> None:
    dep = build.deployment(OWNER, spec(), build.PRIMARY, build.resolve_training_job(training_job()))
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert c["command"] == ["python", "-m", "aidc_server"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert mounts_of(dep)["/tmp"]["name"] == "tmp"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http", "scheme": "HTTP"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 8081, "protocol": "TCP"},
    ]


@pytest.mark.parametrize(("port", "grpc"), [(8080, 8081), (9000, 8081), (8081, 8082)])
def test_grpc_is_a_named_port_of_the_pod_and_the_service(port: int, grpc: int) -> None:
    s = spec(port=port, env=[{"name": "AIDC_GRPC_PORT", "value": "1"}])
    dep = build.deployment(OWNER, s, build.PRIMARY, build.resolve_training_job(training_job()))
    ports = {p["name"]: p["containerPort"] for p in container(dep)["ports"]}
    assert ports == {"http": port, "grpc": grpc}  # never the HTTP port twice
    assert env_of(dep)["AIDC_GRPC_PORT"] == str(grpc)  # the wiring is ours, not spec.env's
    svc_ports = {p["name"]: p for p in build.service(OWNER, s)["spec"]["ports"]}
    assert svc_ports["grpc"] == {
        "name": "grpc", "port": 8081, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc",
    }  # fmt: skip


def test_tls_switches_probes_service_and_url_to_https() -> None:
    s = spec(tlsSecretRef={"name": "cert"})
    dep = build.deployment(OWNER, s, build.PRIMARY, build.resolve_training_job(training_job()))
    env = env_of(dep)
    assert env["AIDC_TLS_CERT"] == "/var/run/aidc/tls/tls.crt"
    assert env["AIDC_TLS_KEY"] == "/var/run/aidc/tls/tls.key"
    assert volumes_of(dep)["tls"]["secret"]["secretName"] == "cert"
    assert container(dep)["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert build.service(OWNER, s)["spec"]["ports"][0]["port"] == 443
    assert build.url(OWNER, s) == "https://mnist.team-a.svc.cluster.local/v2/models/mnist"


def test_pods_ask_prometheus_to_scrape_their_metrics_and_users_may_say_otherwise() -> None:
    """The conventional prometheus.io annotations (a Prometheus pod job, and so the inflight autoscaler's
    adapter, finds the servers by them); HTTPS with TLS; the user's own annotation wins."""
    job = build.resolve_training_job(training_job())
    plain = build.deployment(OWNER, spec(port=9000), build.PRIMARY, job)["spec"]["template"]["metadata"]
    assert plain["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9000",
        "prometheus.io/path": "/metrics",
        "prometheus.io/scheme": "http",
    }
    tls = build.deployment(OWNER, spec(tlsSecretRef={"name": "cert"}), build.PRIMARY, job)
    assert tls["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    mine = spec(podTemplate={"annotations": {"prometheus.io/scrape": "false", "team": "a"}})
    dep = build.deployment(OWNER, mine, build.PRIMARY, job)
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false" and annotations["team"] == "a"


def test_gpus_resources_and_gpu_toleration() -> None:
    s = spec(gpus=2, resources={"requests": {"cpu": "4"}, "limits": {"memory": "8Gi"}})
    dep = build.deployment(OWNER, s, build.PRIMARY, build.resolve_training_job(training_job()))
    res = container(dep)["resources"]
    assert res["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "2"}
    assert res["requests"] == {"cpu": "4", "nvidia.com/gpu": "2"}
    assert dep["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_only = build.deployment(OWNER, spec(), build.PRIMARY, build.resolve_training_job(training_job()))
    assert "nvidia.com/gpu" not in str(container(cpu_only)["resources"])


def test_primary_leaves_replicas_to_the_autoscaler() -> None:
    s = spec(replicas={"min": 2, "max": 6, "targetCpuUtilization": 70})
    dep = build.deployment(OWNER, s, build.PRIMARY, build.resolve_training_job(training_job()))
    assert "replicas" not in dep["spec"]
    assert dep["metadata"]["labels"][LABEL_ISVC] == "mnist"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-9"
    hpa = build.autoscaler(OWNER, s)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "mnist"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70


def test_canary_is_a_second_deployment_behind_the_same_service() -> None:
    s = spec(canary={"trafficPercent": 25, "model": {"fromTrainingJob": "mnist-v2"}})
    resolved = build.resolve_training_job(training_job("mnist-v2"))
    canary = build.deployment(OWNER, s, build.CANARY, resolved, replicas=1)
    assert canary["metadata"]["name"] == "mnist-canary"
    assert canary["spec"]["replicas"] == 1
    assert env_of(canary)["AIDC_CHECKPOINT_DIR"] == "/checkpoints/mnist-v2"
    assert env_of(canary)["AIDC_MODEL_NAME"] == "mnist"  # one URL whichever pod answers
    assert canary["spec"]["template"]["metadata"]["labels"][LABEL_ROLE] == "canary"
    svc = build.service(OWNER, s)
    assert svc["spec"]["selector"] == {LABEL_ISVC: "mnist"}  # both roles
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"][0] == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}


def test_service_selects_one_role_at_zero_and_hundred_percent_and_without_canary() -> None:
    def sel(**kw):
        return build.service(OWNER, spec(**kw))["spec"]["selector"].get(LABEL_ROLE)

    model = {"fromTrainingJob": "v2"}
    assert sel() == "primary"
    assert sel(canary={"trafficPercent": 0, "model": model}) == "primary"
    assert sel(canary={"trafficPercent": 100, "model": model}) == "canary"
    assert sel(canary={"trafficPercent": 50, "model": model}) is None


@pytest.mark.parametrize(
    ("primary", "percent", "canary"),
    [(1, 0, 0), (1, 10, 1), (9, 10, 1), (3, 25, 1), (6, 50, 6), (4, 100, 4), (3, 75, 9)],
)
def test_canary_replicas_follow_the_traffic_ratio(primary: int, percent: int, canary: int) -> None:
    assert build.canary_replicas(primary, percent) == canary


def test_effective_share_is_reported_honestly() -> None:
    assert build.effective_canary_percent(1, 1, 10) == 50  # one of each: half, whatever was asked
    assert build.effective_canary_percent(9, 1, 10) == 10
    assert build.effective_canary_percent(3, 0, 50) == 0


def test_user_pod_template_is_merged() -> None:
    s = spec(
        podTemplate={
            "labels": {"team": "a"},
            "nodeSelector": {"pool": "infer"},
            "tolerations": [{"key": "spot", "operator": "Exists"}],
            "serviceAccountName": "server",
            "volumes": [{"name": "extra", "emptyDir": {}}],
            "volumeMounts": [{"name": "extra", "mountPath": "/extra"}],
            "terminationGracePeriodSeconds": 120,
        }
    )
    dep = build.deployment(OWNER, s, build.PRIMARY, build.resolve_training_job(training_job()))
    pod = dep["spec"]["template"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 120  # a longer drain for slow requests
    default = build.deployment(OWNER, spec(), build.PRIMARY, build.resolve_training_job(training_job()))
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    assert pod["metadata"]["labels"]["team"] == "a"
    assert pod["metadata"]["labels"][LABEL_ROLE] == "primary"
    assert pod["spec"]["nodeSelector"] == {"pool": "infer"}
    assert pod["spec"]["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    assert pod["spec"]["serviceAccountName"] == "server"
    assert "/extra" in mounts_of(dep) and "extra" in volumes_of(dep)


@pytest.mark.parametrize(
    ("grace", "user_env", "drain", "timeout"),
    [
        (120, [], "2", "115"),  # slow requests get the time the user allowed, up to 3 s before SIGKILL
        (10, [], "2", "5"),
        (4, [], "0.5", "0.5"),  # a drain cut short never outlives the grace period
        (0, [], "0", "0"),
        (120, [{"name": "AIDC_DRAIN_TIMEOUT_SECONDS", "value": "60"}], "2", "60"),  # theirs wins
    ],
)
def test_a_set_grace_period_bounds_the_servers_drain(grace, user_env, drain, timeout) -> None:
    s = spec(env=user_env, podTemplate={"terminationGracePeriodSeconds": grace})
    dep = build.deployment(OWNER, s, build.PRIMARY, build.resolve_training_job(training_job()))
    env = env_of(dep)
    assert (env["AIDC_DRAIN_SECONDS"], env["AIDC_DRAIN_TIMEOUT_SECONDS"]) == (drain, timeout)
    unset = env_of(build.deployment(OWNER, spec(), build.PRIMARY, build.resolve_training_job(training_job())))
    assert "AIDC_DRAIN_TIMEOUT_SECONDS" not in unset  # the server's 2 s + 30 s fit the default 45 s


def test_the_model_server_accepts_every_setting_the_operator_renders() -> None:
    """Contract with aidc_server: its own settings parser reads the environment we render."""
    from aidc_server.config import parse_args

    s = spec(
        model={"fromTrainingJob": "mnist-ddp", "quantize": "int8", "watchSeconds": 7},
        batching={"maxBatchSize": 8, "maxLatencyMs": 3},
        tlsSecretRef={"name": "cert"},
        port=9000,
        podTemplate={"terminationGracePeriodSeconds": 4},
    )
    resolved = build.resolve_training_job(training_job(encryption={"kekSecretRef": {"name": "kek"}}))
    settings = parse_args([], environ=env_of(build.deployment(OWNER, s, build.PRIMARY, resolved)))
    assert settings.checkpoint_dir == "/checkpoints/mnist-ddp" and settings.model_name == "mnist"
    assert (settings.port, settings.max_batch_size, settings.max_latency_ms) == (9000, 8, 3.0)
    assert settings.grpc_port == 8081
    assert settings.quantize == "int8" and settings.watch_seconds == 7.0
    assert (settings.drain_seconds, settings.drain_timeout_seconds) == (0.5, 0.5)
    assert settings.key_dir == "/var/run/aidc/keys" and settings.kek_file == "/var/run/aidc/kek/kek"
    assert (
        settings.tls_cert == "/var/run/aidc/tls/tls.crt" and settings.tls_key == "/var/run/aidc/tls/tls.key"
    )
    plain = parse_args([], environ=env_of(build.deployment(OWNER, spec(), build.PRIMARY, resolved)))
    assert plain.quantize is None and plain.tls_cert is None
