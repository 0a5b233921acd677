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
