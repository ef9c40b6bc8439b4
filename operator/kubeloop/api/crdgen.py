"""Generate CustomResourceDefinitions from the pydantic models.

pydantic emits JSON Schema 2020-12 with ``$ref``s, ``anyOf`` for optionals and numeric
``exclusiveMinimum``; Kubernetes wants a *structural* OpenAPI v3.0 schema: everything
inlined, no ``anyOf`` with null, boolean ``exclusiveMinimum``. ``structural`` converts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from kubeloop import GROUP, VERSION
from kubeloop.api import KINDS
from kubeloop.api.base import VALUE_VALIDATIONS, Resource, cel

_DROP = {"title", "additionalProperties_false"}
Schema = dict[str, Any]


def structural(schema: Schema, defs: dict[str, Schema]) -> Schema:
    """Convert one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    if "$ref" in schema:
        target = structural(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        return _merge(target, structural(extra, defs)) if extra else target
    node = dict(schema)
    for combinator in ("anyOf", "allOf"):
        if combinator in node:
            options = [o for o in node.pop(combinator) if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"unions are not structural: {schema}")
            node = _merge(structural(options[0], defs), node)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            if value is False:
                continue
            out[key] = structural(value, defs) if isinstance(value, dict) else value
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "patternProperties":
            ((pattern, sub),) = value.items()
            out["additionalProperties"] = structural(sub, defs)
            out["x-kubernetes-validations"] = [
                *out.get("x-kubernetes-validations", []),
                cel(f"self.all(k, k.matches('{pattern}'))", f"keys must match {pattern}"),
            ]
        elif key == "propertyNames":
            # Not part of Kubernetes' schema dialect: check the keys with CEL instead.
            rules = []
            if "pattern" in value:
                rules.append(
                    cel(
                        f"self.all(k, k.matches('{value['pattern']}'))",
                        f"keys must match {value['pattern']}",
                    )
                )
            if "maxLength" in value:
                rules.append(
                    cel(
                        f"self.all(k, size(k) <= {value['maxLength']})",
                        f"keys must be at most {value['maxLength']} characters",
                    )
                )
            out["x-kubernetes-validations"] = [*out.get("x-kubernetes-validations", []), *rules]
        elif key == "x-kubernetes-validations":
            out[key] = [*out.get(key, []), *value]
        elif key == VALUE_VALIDATIONS:
            out.update(value)  # already structural value validations (anyOf/allOf/not)
        else:
            out[key] = value
    if out.get("type") == "object" and "additionalProperties" in out and "maxProperties" not in out:
        # pydantic renders dict max_length as maxProperties already; default a bound anyway.
        out["maxProperties"] = 64
    return out


def _merge(base: Schema, extra: Schema) -> Schema:
    merged = dict(base)
    for key, value in extra.items():
        if key == "x-kubernetes-validations":
            merged[key] = [*merged.get(key, []), *value]
        elif key == "items" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class _WithFactoryDefaults(GenerateJsonSchema):
    """Emit defaults produced by ``default_factory`` too.

    The API server applies defaults only inside objects that exist, so a nested object with
    defaults needs a default itself; lists such as canary steps need theirs literally.
    """

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().default_schema(schema)
        inner = self.generate_inner(schema["schema"])
        value = factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            # The whole defaulted object: CEL rules on it are checked against the default.
            value = value.model_dump(by_alias=True, mode="json", exclude_none=True)
        if value == [] or (value == {} and "properties" not in inner and "$ref" not in inner):
            return inner  # empty lists and maps: omitting them is the same
        return {**inner, "default": value}


def _schema_of(model: type[Any]) -> Schema:
    raw = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults
    )
    return structural(raw, raw.get("$defs", {}))


def crd_for(kind: type[Resource]) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    info = kind.crd
    spec_field = kind.model_fields["spec"].annotation
    status_field = kind.model_fields["status"].annotation
    assert isinstance(spec_field, type)
    assert isinstance(status_field, type)
    root: Schema = {
        "type": "object",
        "description": info.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # Names become child-object names and label values: 63 characters at most.
            "metadata": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 63}},
            },
            "spec": _schema_of(spec_field),
            "status": _schema_of(status_field),
        },
    }
    if info.root_rules:
        root["x-kubernetes-validations"] = [dict(r) for r in info.root_rules]
    columns = [
        {
            "name": c.name,
            "type": c.type,
            "jsonPath": c.json_path,
            **({"description": c.description} if c.description else {}),
            **({"priority": c.priority} if c.priority else {}),
        }
        for c in info.columns
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": list(info.categories),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    **(
                        {"selectableFields": [{"jsonPath": f} for f in info.selectable_fields]}
                        if info.selectable_fields
                        else {}
                    ),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name → CRD, for every kind."""
    return {f"{GROUP}_{kind.crd.plural}.yaml": crd_for(kind) for kind in KINDS}
