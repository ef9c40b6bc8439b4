"""The generated CRDs are structural, bounded, and say what kubectl needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubeloop.api import KINDS
from kubeloop.api.crdgen import all_crds, crd_for
from kubeloop.contract.durations import DURATION_PATTERN

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


# What a branch of anyOf/allOf/oneOf/not may say in a structural schema: value validations
# only (no type, description, default), over fields the structural part declares.
VALUE_KEYWORDS = {
    "properties", "items", "anyOf", "allOf", "oneOf", "not", "enum", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "pattern", "minLength", "maxLength", "minItems",
    "maxItems", "minProperties", "maxProperties", "multipleOf", "required", "uniqueItems",
}  # fmt: skip
# Numeric, string, list and map bounds: OpenAPI applies each by the value's own type, so they
# may sit on an untyped node (and not-enum, which refuses booleans there).
UNTYPED_BOUNDS = {
    "minimum", "maximum", "pattern", "maxLength", "minItems", "maxItems", "minProperties",
    "maxProperties", "not",
}  # fmt: skip


def _value_only(branch: Node, path: str) -> None:
    assert set(branch) <= VALUE_KEYWORDS, f"{path}: {set(branch) - VALUE_KEYWORDS}"
    for sub in branch.get("properties", {}).values():
        _value_only(sub, path)
    for key in ("items", "not"):
        if key in branch:
            _value_only(branch[key], path)
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in branch.get(key, []):
            _value_only(sub, path)


def test_schema_is_structural(schema: Node) -> None:
    for path, node in _walk(schema):
        for forbidden in ("$ref", "title", "patternProperties", "propertyNames", "$defs"):
            assert forbidden not in node, f"{path} has {forbidden}"
        for combinator in ("anyOf", "allOf", "oneOf"):
            for branch in node.get(combinator, []):
                _value_only(branch, f"{path}.{combinator}")
        if "not" in node:
            _value_only(node["not"], f"{path}.not")
        if path != ".metadata" and path not in UNTYPED:
            assert "type" in node, f"{path} has no type"


# Kept as given by the API server (Kubernetes' schema dialect has no number-or-string type) and
# held by value validations only (CEL cannot see an untyped field); the model checks the rest.
UNTYPED = {".spec.signals[].threshold"}


def test_untyped_fields_keep_unknown_fields_and_nothing_else_is_untyped(schema: Node) -> None:
    for path, node in _walk(schema):
        if path in UNTYPED:
            assert node.get("x-kubernetes-preserve-unknown-fields") is True, path
            allowed = {"description", "x-kubernetes-preserve-unknown-fields", *UNTYPED_BOUNDS}
            assert set(node) <= allowed, node


def _node(kind: str, *path: str) -> Node:
    crds = {c["spec"]["names"]["kind"]: c for c in all_crds().values()}
    node: Node = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for p in path:
        node = node["properties"][p] if p != "[]" else node["items"]
    return node


def test_threshold_is_number_or_auto_by_value_validations() -> None:
    threshold = _node("DriftPolicy", "spec", "signals", "[]", "threshold")
    assert threshold["minimum"] == 0
    assert threshold["pattern"] == "^auto$"
    # minItems > maxItems refuses every list; likewise every map.
    assert threshold["minItems"] > threshold["maxItems"]
    assert threshold["minProperties"] > threshold["maxProperties"]
    assert threshold["not"] == {"enum": [True, False]}
    # A fraction's threshold is at most 1: anyOf(threshold <= 1, type not a fraction).
    branches = _node("DriftPolicy", "spec", "signals", "[]")["anyOf"]
    assert branches[0] == {"properties": {"threshold": {"maximum": 1}}}
    assert set(branches[1]["properties"]["type"]["not"]["enum"]) == {"accuracy", "f1", "js", "ks"}


# for: 0s means act on the first breaching evaluation; every other duration is a period or a
# wait, where 0s (or 500ms) would make the operator spin.
MAY_BE_ZERO = {("DriftPolicy", ".spec.for")}


def test_every_duration_is_at_least_1s_where_0s_means_nothing() -> None:
    seen = set()
    for kind in KINDS:
        root = crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(root):
            if node.get("pattern") != DURATION_PATTERN:
                continue
            seen.add((kind.crd.kind, path))
            rules = [r["rule"] for r in node.get("x-kubernetes-validations", [])]
            if (kind.crd.kind, path) in MAY_BE_ZERO:
                assert "duration(self) >= duration('1s')" not in rules, path
            else:
                assert "duration(self) >= duration('1s')" in rules, path
    assert {("ModelDeployment", ".spec.rollout.interval"), *MAY_BE_ZERO} <= seen


def test_label_maps_check_their_keys_with_cel() -> None:
    for kind, path in (
        ("TrainingRun", ("spec", "resources", "nodeSelector")),
        ("ModelDeployment", ("spec", "serving", "resources", "nodeSelector")),
        ("TrainingRun", ("spec", "registration", "labels")),
    ):
        node = _node(kind, *path)
        assert any("indexOf('/') <= 253" in r["rule"] for r in node["x-kubernetes-validations"])
        assert node["additionalProperties"]["maxLength"] == 63


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
