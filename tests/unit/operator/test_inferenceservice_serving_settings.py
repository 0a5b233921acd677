"""spec.precision, spec.maxRequestBytes and spec.gpus reach the model server as settings it accepts."""

from __future__ import annotations

from aidc_operator.admission import validate_inferenceservice
from aidc_operator.api.inferenceservice import InferenceServiceSpec
from aidc_operator.builders import inferenceservice as build
from aidc_operator.builders.common import Owner
from aidc_server.config import parse_args

OWNER = Owner("InferenceService", "lm", "team-a", "uid-1")
STORAGE = {"storage": {"volume": {"persistentVolumeClaim": {"claimName": "ckpt"}}, "path": "lm"}}


def server_env(**spec) -> dict[str, str]:
    s = InferenceServiceSpec.model_validate({"model": STORAGE, **spec})
    dep = build.deployment(OWNER, s, build.PRIMARY, build.resolve_storage(s.model))
    return {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_gpu_precision_and_request_limit_reach_the_server():
    env = server_env(gpus=1, precision="bf16", maxRequestBytes=8 * 1024 * 1024)
    assert (env["AIDC_DEVICE"], env["AIDC_PRECISION"], env["AIDC_MAX_REQUEST_BYTES"]) == (
        "cuda",
        "bf16",
        "8388608",
    )
    settings = parse_args([], environ=env)
    assert (settings.device, settings.precision, settings.max_request_bytes) == (
        "cuda",
        "bf16",
        8 * 1024 * 1024,
    )


def test_defaults_serve_fp32_on_the_cpu_with_a_64_mib_limit():
    settings = parse_args([], environ=server_env())
    assert (settings.device, settings.precision, settings.max_request_bytes) == (
        "cpu",
        "fp32",
        64 * 1024 * 1024,
    )


def test_int8_is_refused_with_a_gpu_or_a_lower_precision():
    int8 = {**STORAGE, "quantize": "int8"}
    assert validate_inferenceservice("lm", {"model": int8}) == []
    [gpu] = validate_inferenceservice("lm", {"model": int8, "gpus": 1})
    assert gpu.startswith("spec.model.quantize: int8 runs on CPU")
    [bf16] = validate_inferenceservice("lm", {"model": int8, "precision": "bf16"})
    assert bf16 == "spec.model.quantize: int8 does not combine with precision bf16"
