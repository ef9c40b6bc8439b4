"""Shared machinery of the API models: camelCase aliases, CRD metadata on the class.

The pydantic models are the single source of the CRDs (see ``api/crdgen.py``): every
field's description, bound, enum and CEL rule is declared here, next to the Python type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel

from kubeloop.contract.durations import seconds


class ApiModel(BaseModel):
    """Base of every spec/status model: camelCase in YAML, snake_case in Python, strict keys."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


def cel(
    rule: str,
    message: str,
    *,
    field_path: str | None = None,
    reason: str | None = None,
    message_expression: str | None = None,
) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry. ``message_expression`` (CEL returning a string)
    lets the message quote the value; ``message`` stays the fallback."""
    entry = {"rule": rule, "message": message}
    if message_expression:
        entry["messageExpression"] = message_expression
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules for a model or a field."""
    return {"x-kubernetes-validations": list(rules)}


def immutable(what: str) -> dict[str, Any]:
    return validations(cel("self == oldSelf", f"{what} is immutable"))


# Key of ``json_schema_extra`` whose value crdgen copies verbatim into the CRD node: value
# validations (``allOf``/``anyOf``/``not`` over bounds) for what CEL cannot see, such as a
# field kept with x-kubernetes-preserve-unknown-fields. pydantic's own anyOf/allOf mean unions.
VALUE_VALIDATIONS = "x-kubeloop-value-validations"


def value_validations(**schema: Any) -> dict[str, Any]:
    """``json_schema_extra`` carrying OpenAPI value validations, e.g. ``allOf=[...]``."""
    return {VALUE_VALIDATIONS: schema}


# Bounded scalar types reused across kinds. Every string and list in the CRDs is bounded
# so CEL cost estimation passes and a typo cannot store megabytes in etcd.
DNSLabel = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
]
ShortText = Annotated[str, StringConstraints(max_length=256)]
LongText = Annotated[str, StringConstraints(max_length=4096)]
Duration = Annotated[
    str, StringConstraints(max_length=32, pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$")
]


def _at_least_1s(text: str) -> str:
    if seconds(text) < 1:
        raise ValueError(f"{text!r} is shorter than 1s: give a duration of at least 1s, e.g. 30s")
    return text


# A period or a wait: 0s (or 500ms) would make the operator spin, so at least a second.
PositiveDuration = Annotated[
    Duration,
    AfterValidator(_at_least_1s),
    Field(
        json_schema_extra=validations(
            cel(
                "duration(self) >= duration('1s')",
                "must be at least 1s",
                message_expression="'must be at least 1s, not ' + self",
            )
        )
    ),
]
Quantity = Annotated[
    str,
    StringConstraints(max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"),
]
# Kubernetes label syntax (apimachinery's IsQualifiedName / IsValidLabelValue). Written without
# backslashes so the same text works in a CEL string literal.
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_PATTERN = rf"^({DNS_SUBDOMAIN}/)?{LABEL_NAME}$"
LABEL_VALUE_PATTERN = rf"^({LABEL_NAME})?$"
LABEL_KEY_HELP = (
    "a label key is an optional prefix (a DNS subdomain of at most 253 characters) and /, "
    "then a name of 1-63 letters, digits, '-', '_' or '.' that starts and ends with a letter "
    "or digit, e.g. nvidia.com/gpu.product"
)


def label_key_rule(expr: str) -> str:
    """CEL that is true when ``expr`` (a string) is a Kubernetes label key."""
    return f"{expr}.matches('{LABEL_KEY_PATTERN}') && {expr}.indexOf('/') <= 253"


def check_label_key(key: str) -> str:
    prefix, _, _ = key.rpartition("/")
    if not re.fullmatch(LABEL_KEY_PATTERN, key) or len(prefix) > 253:
        raise ValueError(f"{key!r} is not a label key: {LABEL_KEY_HELP}")
    return key


# The map's CEL rule checks the keys with a readable message; the schema of a key stays plain.
LabelKey = Annotated[
    str, AfterValidator(check_label_key), WithJsonSchema({"type": "string", "maxLength": 317})
]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE_PATTERN)]
LabelMap = Annotated[
    dict[LabelKey, LabelValue],
    Field(
        max_length=64,
        json_schema_extra=validations(
            cel(
                f"self.all(k, {label_key_rule('k')})",
                f"keys must be label keys: {LABEL_KEY_HELP}",
                message_expression=f'"key " + self.filter(k, !({label_key_rule("k")}))[0] + '
                f'" is not a label key: {LABEL_KEY_HELP}"',
            )
        ),
    ),
]
SecretName = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=rf"^{DNS_SUBDOMAIN}$")
]
MetricName = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9_]*$")
]


class Condition(ApiModel):
    """A Kubernetes-style condition (same shape as metav1.Condition)."""

    type: Annotated[str, StringConstraints(max_length=63, pattern=r"^[A-Z][A-Za-z0-9]*$")] = Field(
        description="Condition type, e.g. Ready, Progressing, Degraded."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: Annotated[str, StringConstraints(max_length=128)] = Field(
        default="", description="CamelCase machine-readable reason for the last transition."
    )
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        default="", description="Human-readable detail."
    )
    last_transition_time: Annotated[str, StringConstraints(max_length=64)] = Field(
        default="", description="When status last changed (RFC 3339)."
    )
    observed_generation: int = Field(
        default=0, ge=0, description="metadata.generation the condition was computed from."
    )


# kopf's own bookkeeping (the spec it last handled, the progress of retried handlers), kept in
# the status so that one status write records a reconcile (annotations would be a second write
# to the object). The operator's own status writes leave it out (exclude): only kopf writes it.
KopfState = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "description": "kopf's state: the last handled spec and handler progress.",
        }
    ),
]


class StatusBase(ApiModel):
    """Fields every kind's status carries."""

    kopf: KopfState = Field(default_factory=dict, exclude=True)

    observed_generation: int = Field(
        default=0, ge=0, description="The metadata.generation this status was computed from."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready, Progressing, Degraded and domain conditions.",
    )


class ObjectMeta(BaseModel):
    """The part of metadata the operator reads. Unknown keys are ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: str
    namespace: str = ""
    uid: str = ""
    generation: int = 0
    resource_version: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    deletion_timestamp: str | None = None
    creation_timestamp: str | None = None


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class CRDInfo:
    """What the CRD says besides the schema: names, columns, root-level rules."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = ("kubeloop",)
    root_rules: tuple[dict[str, str], ...] = field(default_factory=tuple)
    selectable_fields: tuple[str, ...] = ()
    description: str = ""

    @property
    def singular(self) -> str:
        return self.kind.lower()


def ready_columns() -> tuple[PrinterColumn, ...]:
    """READY/REASON columns read from the Ready condition, plus AGE."""
    return (
        PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        PrinterColumn("Reason", '.status.conditions[?(@.type=="Ready")].reason', priority=1),
        PrinterColumn("Age", ".metadata.creationTimestamp", type="date"),
    )


class Resource(BaseModel):
    """A whole custom object as the API server returns it: parsed at the edge."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    crd: ClassVar[CRDInfo]

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Self:
        """The request body becomes a model at the edge, before any logic runs (a
        ``pydantic.ValidationError`` names the field otherwise)."""
        return cls.model_validate(dict(body))

    api_version: str = ""
    kind: str = ""
    metadata: ObjectMeta

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace
