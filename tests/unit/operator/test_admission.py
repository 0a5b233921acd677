"""Admission rules (aidc_operator.admission) as properties over generated specs: > 10,000 in all.

Valid specs are generated from the documented rules (not from the implementation), invalid ones are a
valid spec with exactly one rule broken, and fuzz specs are arbitrary JSON. Properties: valid ones are
accepted (also after defaulting), invalid ones are rejected with a message naming the broken field, and
nothing ever raises.
"""

from __future__ import annotations

import copy
import json
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aidc_operator.admission import (
    default_inferenceservice,
    default_trainingjob,
    trainingjob_edit_problems,
    validate_inferenceservice,
    validate_trainingjob,
)
from aidc_operator.api import InferenceServiceSpec, TrainingJobSpec
from aidc_operator.api.trainingjob import FailurePolicy

QUOTA = {
    "valid_tj": 3000,
    "invalid_tj": 3000,
    "fuzz_tj": 1500,
    "valid_isvc": 1000,
    "invalid_isvc": 1000,
    "fuzz_isvc": 500,
}
assert sum(QUOTA.values()) >= 10_000


def check_property(quota: str, **strats: st.SearchStrategy[Any]) -> Callable[[Callable[..., None]], None]:
    """Runs the decorated body on QUOTA[quota] generated examples at once (no deadline, no example
    database) and checks that many really ran."""

    def run(body: Callable[..., None]) -> None:
        count = 0

        @settings(
            max_examples=QUOTA[quota],
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(**strats)
        def counted(**kwargs: Any) -> None:
            nonlocal count
            count += 1
            body(**kwargs)

        counted()
        assert count >= QUOTA[quota]

    return run


# ---------------------------------------------------------------------------- generators

LOWER = string.ascii_lowercase
DIGITS = string.digits
dns1123 = st.text(LOWER + DIGITS, min_size=1, max_size=12)
job_name = st.builds(
    lambda a, b: a + b, st.sampled_from(LOWER), st.text(LOWER + DIGITS + "-", max_size=30)
).map(lambda n: n.rstrip("-"))
RESERVED = ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PET_NNODES", "AIDC_KEY_DIR", "AIDC_X"]
env_name = st.text(string.ascii_uppercase + "_", min_size=1, max_size=10).filter(
    lambda n: n not in RESERVED and not n.startswith(("PET_", "MASTER_", "AIDC_")) and n not in ("RANK",)
)
image = st.text(LOWER + DIGITS + "./-:", min_size=1, max_size=24)
volume = st.sampled_from(
    [
        {"persistentVolumeClaim": {"claimName": "ckpt"}},
        {"emptyDir": {}},
        {"nfs": {"server": "10.0.0.1", "path": "/ckpt"}},
        {"name": "ignored", "hostPath": {"path": "/data"}},
    ]
)
duration = st.tuples(st.integers(1, 10_000), st.sampled_from(["s", "m", "h"])).map(lambda t: f"{t[0]}{t[1]}")


def maybe(d: dict[str, Any], key: str, value: Any, present: bool) -> None:
    if present:
        d[key] = value


@st.composite
def valid_tj(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    spec: dict[str, Any] = {}
    ppn = draw(st.integers(1, 64))
    maybe(spec, "procPerNode", ppn, draw(st.booleans()) or ppn != 1)
    # gpusPerNode: absent (defaults to procPerNode), 0 (CPU), or at least one GPU per process.
    gpus = draw(st.one_of(st.none(), st.just(0), st.integers(ppn, 64)))
    maybe(spec, "gpusPerNode", gpus, gpus is not None)
    if draw(st.booleans()):
        lo = draw(st.integers(1, 1024))
        hi = draw(st.integers(lo, 1024))
        spec["elastic"] = {"minNodes": lo, "maxNodes": hi}
        maybe(spec["elastic"], "maxRestarts", draw(st.integers(0, 1000)), draw(st.booleans()))
        spec["nodes"] = draw(st.integers(lo, hi))
    else:
        maybe(spec, "nodes", draw(st.integers(1, 1024)), draw(st.booleans()))
    fp: dict[str, Any] = {}
    backoff = draw(st.integers(0, 300))
    with_backoff = draw(st.booleans())
    maybe(fp, "backoffSeconds", backoff, with_backoff)
    # Left out, backoffSeconds is its default (10), which a valid maxBackoffSeconds must not undercut.
    effective = backoff if with_backoff else FailurePolicy().backoff_seconds
    maybe(fp, "maxBackoffSeconds", draw(st.integers(max(effective, 1), 86400)), draw(st.booleans()))
    maybe(fp, "maxRestarts", draw(st.integers(0, 10000)), draw(st.booleans()))
    maybe(fp, "nodeFailure", draw(st.sampled_from(["RestartGang", "Fail"])), draw(st.booleans()))
    maybe(fp, "retryableExitCodes", draw(st.lists(st.integers(1, 255), max_size=5)), draw(st.booleans()))
    maybe(spec, "failurePolicy", fp, bool(fp) or draw(st.booleans()))
    ckpt: dict[str, Any] = {}
    maybe(ckpt, "volume", draw(volume), draw(st.booleans()))
    maybe(ckpt, "everySteps", draw(st.integers(1, 10**6)), draw(st.booleans()))
    maybe(ckpt, "everySeconds", draw(st.integers(1, 10**6)), draw(st.booleans()))
    maybe(ckpt, "keep", draw(st.integers(1, 1000)), draw(st.booleans()))
    enc: dict[str, Any] = {"enabled": draw(st.booleans())}
    if enc["enabled"]:
        maybe(enc, "keySecretRef", {"name": draw(dns1123)}, draw(st.booleans()))
        maybe(enc, "kekSecretRef", {"name": draw(dns1123)}, draw(st.booleans()))
        maybe(enc, "rotateAfter", draw(duration), "keySecretRef" not in enc and draw(st.booleans()))
        maybe(enc, "keyRetention", draw(st.sampled_from(["Retain", "Delete"])), draw(st.booleans()))
    maybe(ckpt, "encryption", enc, draw(st.booleans()))
    maybe(spec, "checkpoint", ckpt, bool(ckpt))
    names = draw(st.lists(env_name, max_size=4, unique=True))
    maybe(spec, "env", [{"name": n, "value": draw(st.text(max_size=8))} for n in names], bool(names))
    maybe(spec, "image", draw(image), draw(st.booleans()))
    maybe(
        spec,
        "command",
        ["python", "-m", draw(st.text(LOWER + "_.", min_size=1, max_size=12))],
        draw(st.booleans()),
    )
    maybe(spec, "masterPort", draw(st.integers(1024, 65535).filter(lambda p: p != 9400)), draw(st.booleans()))
    maybe(spec, "suspend", draw(st.booleans()), draw(st.booleans()))
    maybe(spec, "resources", {"limits": {"cpu": "4", "memory": "16Gi"}}, draw(st.booleans()))
    labels = draw(st.dictionaries(st.text(LOWER + "/", min_size=1, max_size=10), st.text(LOWER, max_size=5)))
    maybe(
        spec,
        "podTemplate",
        {"labels": {k: v for k, v in labels.items() if not k.startswith("aidc.dev/")}},
        True,
    )
    return draw(job_name), spec


# Each breaker takes a valid (name, spec) and a draw function, breaks one rule, and returns the field path
# the rejection must name.
Breaker = Callable[[str, dict[str, Any], st.DrawFn], tuple[str, str]]


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        spec = spec.setdefault(p, {})
    spec[leaf] = value


def br_nodes_range(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s.pop("elastic", None)
    s["nodes"] = d(st.one_of(st.integers(-5, 0), st.integers(1025, 10**6)))
    return name, "spec.nodes"


def br_ppn(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["procPerNode"] = d(st.one_of(st.integers(-3, 0), st.integers(65, 1000)))
    return name, "spec.procPerNode"


def br_gpus_fewer_than_procs(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["procPerNode"] = d(st.integers(2, 64))
    s["gpusPerNode"] = d(st.integers(1, s["procPerNode"] - 1))
    return name, "spec.gpusPerNode"


def br_elastic_order(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    hi = d(st.integers(1, 1023))
    s["elastic"] = {"minNodes": d(st.integers(hi + 1, 1024)), "maxNodes": hi}
    return name, "spec.elastic.minNodes"


def br_nodes_outside_elastic(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    lo = d(st.integers(2, 1000))
    hi = d(st.integers(lo, 1000))
    s["elastic"] = {"minNodes": lo, "maxNodes": hi}
    s["nodes"] = d(st.one_of(st.integers(1, lo - 1), st.integers(hi + 1, 1024)))
    return name, "spec.nodes"


def br_backoff(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    cap = d(st.integers(0, 1000))
    s["failurePolicy"] = {"backoffSeconds": d(st.integers(cap + 1, 86400)), "maxBackoffSeconds": cap}
    return name, "spec.failurePolicy.backoffSeconds"


def br_exit_code(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    codes = d(st.lists(st.integers(1, 255), max_size=3))
    i = d(st.integers(0, len(codes)))
    codes.insert(i, d(st.one_of(st.integers(-1000, 0), st.integers(256, 10**5))))
    s.setdefault("failurePolicy", {})["retryableExitCodes"] = codes
    return name, f"spec.failurePolicy.retryableExitCodes[{i}]"


def br_refs_without_encryption(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    ref = d(st.sampled_from(["keySecretRef", "kekSecretRef"]))
    _set(s, "checkpoint.encryption", {"enabled": False, ref: {"name": d(dns1123)}})
    return name, "spec.checkpoint.encryption.enabled"


def br_rotate_user_key(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    _set(s, "checkpoint.encryption", {"keySecretRef": {"name": d(dns1123)}, "rotateAfter": d(duration)})
    return name, "spec.checkpoint.encryption.rotateAfter"


def br_rotate_zero(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    _set(s, "checkpoint.encryption", {"rotateAfter": d(st.sampled_from(["0s", "0m", "0h0m", "0ms"]))})
    return name, "spec.checkpoint.encryption.rotateAfter"


def br_reserved_env(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    env = s.setdefault("env", [])
    i = d(st.integers(0, len(env)))
    env.insert(i, {"name": d(st.sampled_from(RESERVED)), "value": "x"})
    return name, f"spec.env[{i}].name"


def br_duplicate_env(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    var = d(env_name)
    s["env"] = [{"name": var, "value": "1"}, {"name": var, "value": "2"}]
    return name, "spec.env[1].name"


def br_unknown_field(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    field = d(st.sampled_from(["gpus", "replicas", "nodeCount", "procsPerNode"]))
    s[field] = 1
    return name, f"spec.{field}"


def br_wrong_type(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    field, value = d(
        st.sampled_from([("nodes", "two"), ("suspend", "maybe"), ("command", "python"), ("env", {"A": "b"})])
    )
    s[field] = value
    return name, f"spec.{field}"


def br_gpu_resource(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    where = d(st.sampled_from(["limits", "requests"]))
    s["resources"] = {where: {"nvidia.com/gpu": d(st.integers(1, 8))}}
    return name, f"spec.resources.{where}"


def br_master_port(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["masterPort"] = 9400
    return name, "spec.masterPort"


def br_volume_sources(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    v = d(st.sampled_from([{}, {"name": "x"}, {"emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}]))
    _set(s, "checkpoint.volume", v)
    return name, "spec.checkpoint.volume"


def br_name(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    bad = d(
        st.one_of(
            st.integers(59, 80).map(lambda n: "a" * n), st.sampled_from(["9lives", "Upper", "a_b", "x-"])
        )
    )
    return bad, "metadata.name"


def br_operator_label(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["podTemplate"] = {"labels": {f"aidc.dev/{d(st.text(LOWER, min_size=1, max_size=8))}": "x"}}
    return name, "spec.podTemplate.labels"


def br_image(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["image"] = d(st.sampled_from(["", " repo/img:1", "repo/img :1", "repo/img:1\n"]))
    return name, "spec.image"


def br_command(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["command"] = d(st.sampled_from([[], [""], ["  ", "x"]]))
    return name, "spec.command"


TJ_BREAKERS: list[Breaker] = [
    br_nodes_range,
    br_ppn,
    br_gpus_fewer_than_procs,
    br_elastic_order,
    br_nodes_outside_elastic,
    br_backoff,
    br_exit_code,
    br_refs_without_encryption,
    br_rotate_user_key,
    br_rotate_zero,
    br_reserved_env,
    br_duplicate_env,
    br_unknown_field,
    br_wrong_type,
    br_gpu_resource,
    br_master_port,
    br_volume_sources,
    br_name,
    br_operator_label,
    br_image,
    br_command,
]


@st.composite
def invalid_tj(draw: st.DrawFn) -> tuple[str, dict[str, Any], str, str]:
    name, spec = draw(valid_tj())
    breaker = draw(st.sampled_from(TJ_BREAKERS))
    name, field = breaker(name, spec, draw)
    return name, spec, field, breaker.__name__


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
TJ_KEYS = list(TrainingJobSpec.model_json_schema(by_alias=True)["properties"])
ISVC_KEYS = list(InferenceServiceSpec.model_json_schema(by_alias=True)["properties"])


def fuzz(keys: list[str]) -> st.SearchStrategy[Any]:
    # Mostly dicts with real field names and junk values (deeper paths), sometimes junk all the way.
    return st.one_of(st.dictionaries(st.sampled_from(keys), json_values, max_size=6), json_values)


# ---------------------------------------------------------------------------- TrainingJob properties


def test_valid_trainingjobs_are_accepted_before_and_after_defaulting() -> None:
    @check_property("valid_tj", case=valid_tj())
    def check(case: tuple[str, dict[str, Any]]) -> None:
        name, spec = case
        original = copy.deepcopy(spec)
        assert validate_trainingjob(name, spec) == [], json.dumps(spec)
        defaulted = default_trainingjob(spec)
        assert spec == original, "defaulting must not modify its input"
        assert validate_trainingjob(name, defaulted) == []
        assert default_trainingjob(defaulted) == defaulted, "defaulting is idempotent"
        # What the user set stays; gpusPerNode defaults to procPerNode; some checkpoint trigger exists.
        for key, value in spec.items():
            if key != "checkpoint":
                assert defaulted[key] == value
        assert defaulted["gpusPerNode"] == spec.get("gpusPerNode", spec.get("procPerNode", 1))
        ckpt = defaulted["checkpoint"]
        assert ckpt.get("everySteps") or ckpt.get("everySeconds")


def test_invalid_trainingjobs_are_rejected_naming_the_field() -> None:
    @check_property("invalid_tj", case=invalid_tj())
    def check(case: tuple[str, dict[str, Any], str, str]) -> None:
        name, spec, field, breaker = case
        problems = validate_trainingjob(name, spec)
        assert problems, f"{breaker}: accepted {json.dumps(spec)}"
        assert any(field in p for p in problems), f"{breaker}: no message names {field}: {problems}"
        assert all(isinstance(p, str) and p for p in problems)


def test_arbitrary_trainingjob_input_never_raises() -> None:
    @check_property("fuzz_tj", name=st.one_of(st.text(max_size=70), st.none()), spec=fuzz(TJ_KEYS))
    def check(name: Any, spec: Any) -> None:
        problems = validate_trainingjob(name, spec)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
        default_trainingjob(spec)


# ---------------------------------------------------------------------------- InferenceService properties


@st.composite
def model(draw: st.DrawFn) -> dict[str, Any]:
    m: dict[str, Any] = (
        {"fromTrainingJob": draw(dns1123)}
        if draw(st.booleans())
        else {
            "storage": {
                "volume": draw(volume),
                "path": draw(
                    st.lists(st.text(LOWER + DIGITS + "_-", min_size=1, max_size=6), max_size=3).map("/".join)
                ),
            }
        }
    )
    maybe(m, "name", draw(dns1123), draw(st.booleans()))
    maybe(m, "watchSeconds", draw(st.integers(0, 86400)), draw(st.booleans()))
    return m


@st.composite
def valid_isvc(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    spec: dict[str, Any] = {"model": draw(model())}
    lo = draw(st.integers(1, 1000))
    spec["replicas"] = {"min": lo, "max": draw(st.integers(lo, 1000))}
    gpus = draw(st.integers(0, 16))
    maybe(spec, "gpus", gpus, draw(st.booleans()))
    if gpus == 0 and draw(st.booleans()):
        spec["model"]["quantize"] = "int8"
    maybe(spec, "batching", {"maxBatchSize": draw(st.integers(1, 4096))}, draw(st.booleans()))
    maybe(spec, "port", draw(st.integers(1024, 65535)), draw(st.booleans()))
    if draw(st.booleans()):
        canary = draw(model())
        canary.pop("name", None)  # unset, or the primary's: one URL behind one Service
        # A different model (a canary of the same model is invalid): another hot-swap interval.
        canary["watchSeconds"] = (spec["model"].get("watchSeconds", 30) + 1) % 86401
        if draw(st.booleans()) and spec["model"].get("name"):
            canary["name"] = spec["model"]["name"]
        spec["canary"] = {"trafficPercent": draw(st.integers(0, 100)), "model": canary}
    names = draw(st.lists(env_name, max_size=3, unique=True))
    maybe(spec, "env", [{"name": n, "value": "v"} for n in names], bool(names))
    return draw(job_name), spec


def ib_replicas(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    hi = d(st.integers(1, 999))
    s["replicas"] = {"min": d(st.integers(hi + 1, 1000)), "max": hi}
    return name, "spec.replicas.min"


def ib_scale_to_zero(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["replicas"] = {"min": 0, "max": d(st.integers(1, 1000))}
    return name, "spec.replicas.min"


def ib_canary_name(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    canary = copy.deepcopy(s["model"])
    canary["name"] = "other-" + d(dns1123)
    canary["watchSeconds"] = 7  # not the same model: only the name is wrong
    s["canary"] = {"trafficPercent": 10, "model": canary}
    return name, "spec.canary.model.name"


def ib_both_sources(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["model"] = {"fromTrainingJob": "job", "storage": {"volume": {"emptyDir": {}}}}
    return name, "spec.model"


def ib_no_source(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["model"] = {"name": d(dns1123)}
    return name, "spec.model"


def ib_path_escape(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["model"] = {
        "storage": {"volume": {"emptyDir": {}}, "path": d(st.sampled_from(["/abs", "../up", "a/../../b"]))}
    }
    return name, "spec.model.storage.path"


def ib_int8_gpu(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["gpus"] = d(st.integers(1, 16))
    s["model"]["quantize"] = "int8"
    return name, "spec.model.quantize"


def ib_same_canary(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["canary"] = {"trafficPercent": 10, "model": copy.deepcopy(s["model"])}
    return name, "spec.canary.model"


def ib_reserved_env(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["env"] = [{"name": d(st.sampled_from(["AIDC_MODEL_NAME", "AIDC_PORT", "AIDC_KEY_DIR"])), "value": "x"}]
    return name, "spec.env[0].name"


def ib_name(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    return d(st.sampled_from(["1svc", "Svc", "a" * 57, "svc_1"])), "metadata.name"


def ib_missing_model(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    del s["model"]
    return name, "spec.model"


def ib_gpu_resource(name: str, s: dict[str, Any], d: st.DrawFn) -> tuple[str, str]:
    s["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    return name, "spec.resources.limits"


ISVC_BREAKERS: list[Breaker] = [
    ib_replicas,
    ib_scale_to_zero,
    ib_canary_name,
    ib_both_sources,
    ib_no_source,
    ib_path_escape,
    ib_int8_gpu,
    ib_same_canary,
    ib_reserved_env,
    ib_name,
    ib_missing_model,
    ib_gpu_resource,
]


@st.composite
def invalid_isvc(draw: st.DrawFn) -> tuple[str, dict[str, Any], str, str]:
    name, spec = draw(valid_isvc())
    breaker = draw(st.sampled_from(ISVC_BREAKERS))
    name, field = breaker(name, spec, draw)
    return name, spec, field, breaker.__name__


def test_valid_inferenceservices_are_accepted_before_and_after_defaulting() -> None:
    @check_property("valid_isvc", case=valid_isvc())
    def check(case: tuple[str, dict[str, Any]]) -> None:
        name, spec = case
        assert validate_inferenceservice(name, spec) == [], json.dumps(spec)
        defaulted = default_inferenceservice(name, spec)
        assert validate_inferenceservice(name, defaulted) == []
        assert defaulted["model"]["name"] == spec["model"].get("name", name)
        if "canary" in defaulted:
            assert defaulted["canary"]["model"]["name"] == defaulted["model"]["name"], "one URL"
        assert default_inferenceservice(name, defaulted) == defaulted


def test_invalid_inferenceservices_are_rejected_naming_the_field() -> None:
    @check_property("invalid_isvc", case=invalid_isvc())
    def check(case: tuple[str, dict[str, Any], str, str]) -> None:
        name, spec, field, breaker = case
        problems = validate_inferenceservice(name, spec)
        assert problems, f"{breaker}: accepted {json.dumps(spec)}"
        assert any(field in p for p in problems), f"{breaker}: no message names {field}: {problems}"


def test_arbitrary_inferenceservice_input_never_raises() -> None:
    @check_property("fuzz_isvc", name=st.one_of(st.text(max_size=70), st.none()), spec=fuzz(ISVC_KEYS))
    def check(name: Any, spec: Any) -> None:
        problems = validate_inferenceservice(name, spec)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
        default_inferenceservice(name if isinstance(name, str) else "", spec)


# ---------------------------------------------------------------------------- examples a user would hit


def test_rejection_lists_every_problem_with_its_field() -> None:
    problems = validate_trainingjob(
        "llm",
        {
            "procPerNode": 8,
            "gpusPerNode": 4,
            "env": [{"name": "WORLD_SIZE", "value": "2"}],
            "masterPort": 9400,
        },
    )
    assert problems == [
        "spec.gpusPerNode: 4 GPUs for procPerNode 8 worker processes; each process needs its own GPU "
        "(set gpusPerNode: 0 to train on CPU)",
        "spec.env[0].name: WORLD_SIZE is set by the operator and cannot be overridden",
        "spec.masterPort: 9400 is the trainer's metrics port; choose another",
    ]


def test_defaulting_fills_gpus_and_a_checkpoint_interval_but_keeps_user_values() -> None:
    assert default_trainingjob({"procPerNode": 4}) == {
        "procPerNode": 4,
        "gpusPerNode": 4,
        "checkpoint": {"everySeconds": 600},
    }
    spec = {"procPerNode": 4, "gpusPerNode": 0, "checkpoint": {"everySteps": 100}}
    assert default_trainingjob(spec) == spec


# ------------------------------------------------------------------------------ edits of a started job

STARTED = {"phase": "Running", "startTime": "2026-11-26T11:00:00Z"}
# (case, old status, spec change, field named in the rejection or None): shared with the apiserver's
# CEL rules in tests/integration/cluster/test_crds.py, so the webhook and the CRD answer alike.
EDIT_CASES: list[tuple[str, dict, dict, str | None]] = [
    ("image-running", STARTED, {"image": "example.com/other:2"}, "spec.image"),
    ("command-running", STARTED, {"command": ["python", "train.py"]}, "spec.command"),
    ("procs-running", STARTED, {"procPerNode": 2, "gpusPerNode": 2}, "spec.procPerNode"),
    ("gpus-running", STARTED, {"gpusPerNode": 0}, "spec.gpusPerNode"),
    ("gpus-filled-in", STARTED, {"gpusPerNode": 1}, None),  # what the webhook defaults: no change
    ("keep-running", STARTED, {"checkpoint": {"keep": 5}}, "spec.checkpoint.keep"),
    ("volume-running", STARTED, {"checkpoint": {"volume": {"emptyDir": {}}}}, "spec.checkpoint.volume"),
    (
        "encryption-running",
        STARTED,
        {"checkpoint": {"encryption": {"enabled": False}}},
        "spec.checkpoint.encryption.enabled",
    ),
    ("retention-running", STARTED, {"checkpoint": {"encryption": {"keyRetention": "Delete"}}}, None),
    ("nodes-running", STARTED, {"nodes": 3}, None),  # a declared resize
    ("restarts-running", STARTED, {"failurePolicy": {"maxRestarts": 9}}, None),
    ("image-suspended", {**STARTED, "phase": "Suspended"}, {"image": "example.com/other:2"}, None),
    ("image-not-started", {"phase": "Pending"}, {"image": "example.com/other:2"}, None),
    ("command-succeeded", {**STARTED, "phase": "Succeeded"}, {"command": ["python", "x.py"]}, "spec.command"),
    ("nodes-succeeded", {**STARTED, "phase": "Succeeded"}, {"nodes": 3}, "spec.nodes"),
    ("ttl-succeeded", {**STARTED, "phase": "Succeeded"}, {"ttlSecondsAfterFinished": 60}, None),
]


def _merged(spec: dict, change: dict) -> dict:
    out = copy.deepcopy(spec)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(("case", "status", "change", "field"), EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_a_started_job_rejects_edits_it_cannot_take_naming_the_field(
    case: str, status: dict, change: dict, field: str | None
) -> None:
    spec = TrainingJobSpec(nodes=2).wire()  # as stored: the schema's defaults filled in
    old = {"spec": spec, "status": status}
    problems = trainingjob_edit_problems(old, {"spec": _merged(spec, change), "status": status})
    if field is None:
        assert problems == []
    else:
        assert problems and problems[0].startswith(f"{field} cannot change"), problems
    # The reconciler validates without the old object: a stored object never turns Invalid this way.
    assert validate_trainingjob("job", default_trainingjob(_merged(spec, change))) == []


def test_edit_rules_never_raise_on_odd_objects() -> None:
    for old, new in [(None, None), ({}, {}), ({"status": "x"}, {"spec": 3}), ({"status": STARTED}, {})]:
        trainingjob_edit_problems(old, new)
