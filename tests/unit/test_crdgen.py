"""The generated CRDs are structural, bounded, and say what kubectl needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubeloop.api import KINDS
from kubeloop.api.crdgen import all_crds, crd_for

Node = dict[str, Any]


def _walk(node: Node, path: str = "") -> Iterator[tuple[str, Node]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(params=KINDS, ids=lambda k: k.crd.kind)
def schema(request: pytest.FixtureRequest) -> Node:
    crd = crd_for(request.param)
    root: Node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


def test_schema_is_structural(schema: Node) -> None:
    for path, node in _walk(schema):
        for forbidden in (
            "$ref",
            "anyOf",
            "allOf",
            "oneOf",
            "title",
            "patternProperties",
            "propertyNames",
            "$defs",
        ):
            assert forbidden not in node, f"{path} has {forbidden}"
        if path != ".metadata" and path not in UNTYPED:
            assert "type" in node, f"{path} has no type"


# Kept as given by the API server (Kubernetes' schema dialect has no number-or-string type);
# the operator validates them and refuses with Ready=False.
UNTYPED = {".spec.signals[].threshold"}


def test_untyped_fields_keep_unknown_fields_and_nothing_else_is_untyped(schema: Node) -> None:
    for path, node in _walk(schema):
        if path in UNTYPED:
            assert node.get("x-kubernetes-preserve-unknown-fields") is True, path
            assert set(node) <= {"description", "x-kubernetes-preserve-unknown-fields"}, node


def test_every_string_list_and_map_is_bounded(schema: Node) -> None:
    for path, node in _walk(schema):
        if path.startswith((".apiVersion", ".kind", ".metadata")):
            continue
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path}: string without maxLength"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: list without maxItems"
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path}: map without maxProperties"


def test_every_spec_field_is_described(schema: Node) -> None:
    for path, node in _walk(schema["properties"]["spec"], ".spec"):
        if path.endswith("[]") or path.endswith("{}"):
            continue
        assert node.get("description"), f"{path} has no description (kubectl explain)"


def test_status_has_observed_generation_and_conditions(schema: Node) -> None:
    status = schema["properties"]["status"]["properties"]
    assert status["observedGeneration"]["type"] == "integer"
    condition = status["conditions"]["items"]["properties"]
    assert set(condition) >= {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }


def test_names_columns_and_category() -> None:
    crds = {c["spec"]["names"]["kind"]: c for c in all_crds().values()}
    assert {k: c["spec"]["names"]["shortNames"] for k, c in crds.items()} == {
        "TrainingRun": ["tr"],
        "ModelVersion": ["mv"],
        "ModelDeployment": ["md"],
        "DriftPolicy": ["dp"],
    }
    for crd in crds.values():
        assert crd["spec"]["names"]["categories"] == ["kubeloop"]
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        names = [c["name"] for c in version["additionalPrinterColumns"]]
        assert "Ready" in names
        assert names[-1] == "Age"
    md_columns = [
        c["name"]
        for c in crds["ModelDeployment"]["spec"]["versions"][0]["additionalPrinterColumns"]
    ]
    assert md_columns[:4] == ["Stable", "Canary", "Weight", "Phase"]


def test_cel_rules_are_attached_where_declared() -> None:
    crds = {c["spec"]["names"]["kind"]: c for c in all_crds().values()}

    def rules(kind: str, *path: str) -> list[str]:
        node = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for p in path:
            node = node["properties"][p] if p != "[]" else node["items"]
        return [r["rule"] for r in node.get("x-kubernetes-validations", [])]

    assert any("isSorted" in r for r in rules("ModelDeployment", "spec", "rollout", "steps"))
    assert any("parallelTrials" in r for r in rules("TrainingRun", "spec", "tuning"))
    assert any("oldSelf" in r for r in rules("ModelVersion", "spec"))
    assert any("__namespace__" in r for r in rules("DriftPolicy", "spec", "target"))
