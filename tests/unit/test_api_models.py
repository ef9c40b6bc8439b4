"""The models parse every example, reject what the CRD would, and alias camelCase."""

from __future__ import annotations

import pydantic
import pytest

from kubeloop.api import KINDS, ModelDeployment, ModelVersion, TrainingRun
from tests.conftest import load_examples
from tests.integration.test_validation import BOUNDS, GOOD

BY_KIND = {k.crd.kind: k for k in KINDS}


@pytest.mark.parametrize("doc", load_examples(), ids=lambda d: d["metadata"]["name"])
def test_every_example_parses(doc: dict[str, object]) -> None:
    model = BY_KIND[str(doc["kind"])].model_validate(doc)
    assert model.name


def _mv(**spec: object) -> dict[str, object]:
    base: dict[str, object] = {
        "modelName": "m",
        "version": 1,
        "artifact": {"uri": "s3://bucket/m/1"},
    }
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": "m-v1", "namespace": "ns"},
        "spec": {**base, **spec},
    }


def test_camel_case_aliases_round_trip() -> None:
    mv = ModelVersion.model_validate(_mv(metrics={"f1": 0.9}))
    assert mv.spec.model_name == "m"
    dumped = mv.spec.model_dump(by_alias=True, exclude_defaults=True)
    assert dumped["modelName"] == "m"
    assert "model_name" not in dumped


def test_cross_namespace_reference_is_refused_by_the_model() -> None:
    doc = {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "d", "namespace": "a"},
        "spec": {"model": {"modelVersion": {"name": "x", "namespace": "b"}}},
    }
    with pytest.raises(pydantic.ValidationError, match="cross-namespace references are refused"):
        ModelDeployment.model_validate(doc)


def test_unknown_spec_field_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="modelNmae"):
        ModelVersion.model_validate(_mv(modelNmae="typo"))


def test_negative_gpu_is_rejected() -> None:
    doc = {
        "metadata": {"name": "t"},
        "spec": {
            "data": {"uri": "builtin://digits", "target": "y"},
            "registration": {"modelName": "t"},
            "resources": {"gpu": -1},
        },
    }
    with pytest.raises(pydantic.ValidationError, match=r"resources\.gpu"):
        TrainingRun.model_validate(doc)


def test_defaults_are_filled() -> None:
    doc = {
        "metadata": {"name": "t"},
        "spec": {
            "data": {"uri": "builtin://digits", "target": "y"},
            "registration": {"modelName": "t"},
        },
    }
    run = TrainingRun.model_validate(doc)
    assert run.spec.model.family == "mlp"
    assert run.spec.data.split.seed == 42
    assert run.spec.registration.alias == "candidate"
    assert run.status.phase == ""


def _path(loc: tuple[int | str, ...]) -> str:
    """pydantic's ('spec', 'signals', 0, 'threshold') → spec.signals[0].threshold."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


@pytest.mark.parametrize(
    ("doc", "expected"), [(d, e) for _, d, e in BOUNDS], ids=[i for i, _, _ in BOUNDS]
)
def test_what_the_api_server_refuses_the_model_refuses(
    doc: dict[str, object], expected: tuple[str, ...]
) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        BY_KIND[str(doc["kind"])].model_validate(doc)
    field = expected[0]
    if field.startswith("spec."):
        # The model names the same field (a model-level rule names the object holding it).
        paths = [_path(e["loc"]) for e in info.value.errors()]
        assert any(field.startswith(p) or p.startswith(field) for p in paths), paths


@pytest.mark.parametrize("doc", [d for _, d in GOOD], ids=[i for i, _ in GOOD])
def test_what_the_api_server_accepts_the_model_accepts(doc: dict[str, object]) -> None:
    BY_KIND[str(doc["kind"])].model_validate(doc)
