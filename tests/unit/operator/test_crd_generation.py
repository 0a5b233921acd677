"""crds/ is generated from the pydantic models; these tests fail when the two drift or the schema stops
being one Kubernetes accepts (structural: no $ref, no anyOf, descriptions everywhere)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from aidc_operator.api.crd import all_crds

ROOT = Path(__file__).resolve().parents[3]


def _gen_crds():
    spec = importlib.util.spec_from_file_location("gen_crds", ROOT / "hack" / "gen_crds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_crds_match_the_models() -> None:
    for name, text in _gen_crds().render().items():
        for target in ("crds", "charts/aidc-operator/crds"):
            path = ROOT / target / name
            if path.parent.exists():
                assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make crds`"


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


def test_schemas_are_structural_and_documented() -> None:
    for crd in all_crds().values():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for part in ("spec", "status"):
            for path, node in _walk(root["properties"][part], part):
                assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & node.keys(), path
                assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
                if path.count(".") and not path.endswith(("[]", "{}")):
                    assert node.get("description"), f"{crd['metadata']['name']}: {path} has no description"


def test_status_subresource_and_printer_columns() -> None:
    crds = all_crds()
    tj = crds["aidc.dev_trainingjobs.yaml"]["spec"]
    version = tj["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == ["Phase", "Nodes", "Restarts"]
    assert tj["names"]["shortNames"] == ["tj"]
    rules = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    assert any("minNodes" in r["rule"] for r in rules)


def _spec_schema(crd: str) -> dict[str, Any]:
    version = all_crds()[crd]["spec"]["versions"][0]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_defaults_are_in_the_schema_and_in_what_kubectl_explain_prints() -> None:
    spec = _spec_schema("aidc.dev_trainingjobs.yaml")
    ckpt = spec["properties"]["checkpoint"]
    keep, retention = (
        ckpt["properties"]["keep"],
        ckpt["properties"]["encryption"]["properties"]["keyRetention"],
    )
    assert keep["default"] == 3 and keep["description"].endswith("Default: 3.")
    assert retention["default"] == "Retain" and retention["description"].endswith("Default: Retain.")
    assert spec["properties"]["command"]["default"] == ["python", "-m", "aidc_trainer", "--example", "mlp"]
    assert "Default: 600" in ckpt["properties"]["everySeconds"]["description"]
    for crd in all_crds():
        for path, node in _walk(_spec_schema(crd), "spec"):
            if node.get("default") not in (None, {}, []):
                assert "Default: " in node["description"], f"{crd}: {path} hides its default"
            # A default inside an optional object applies only when the object is given, so it never
            # invents one (elastic, canary …): only objects with `default: {}` are filled in whole.
            if "default" in node and node.get("type") == "object":
                assert node["default"] == {}, path


def test_fields_a_started_job_cannot_take_are_locked_by_transition_rules() -> None:
    from aidc_operator.api.transitions import FROZEN

    root = all_crds()["aidc.dev_trainingjobs.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = {r.get("fieldPath"): r for r in root["x-kubernetes-validations"]}
    for frozen in FROZEN:
        rule = rules[f".spec.{frozen.path}"]
        assert "oldSelf" in rule["rule"], "a transition rule"
        assert rule["message"].startswith(f"spec.{frozen.path} cannot change")
    paths = {f.path for f in FROZEN}
    assert {"image", "command", "procPerNode", "gpusPerNode", "checkpoint.volume"} <= paths
    assert not {"suspend", "failurePolicy", "ttlSecondsAfterFinished"} & paths, "operator-side: editable"
