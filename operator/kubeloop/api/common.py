"""Types shared by several kinds: references, compute resources, scheduling."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, field_validator

from kubeloop.api.base import (
    LABEL_KEY_HELP,
    ApiModel,
    DNSLabel,
    LabelMap,
    LabelValue,
    Quantity,
    cel,
    check_label_key,
    label_key_rule,
    validations,
)

CROSS_NAMESPACE_MESSAGE = (
    "cross-namespace references are refused: omit namespace; the referenced object must "
    "live in this resource's namespace"
)


class LocalRef(ApiModel):
    """A reference to an object in the same namespace."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.__namespace__)",
                CROSS_NAMESPACE_MESSAGE,
                field_path=".namespace",
                reason="FieldValueForbidden",
            )
        )
    }

    name: DNSLabel = Field(description="Name of the object, in this resource's namespace.")
    namespace: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        default=None,
        description="Must be omitted: kubeloop refuses cross-namespace references. Present only "
        "so that a manifest that sets it fails with a clear message.",
    )

    @field_validator("namespace")
    @classmethod
    def _refuse_namespace(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(CROSS_NAMESPACE_MESSAGE)
        return value


def _taint_key(key: str) -> str:
    if key:
        check_label_key(key)
    return key


# A taint key is a label key; empty matches every key (with operator Exists).
TaintKey = Annotated[
    str,
    StringConstraints(max_length=317),
    AfterValidator(_taint_key),
    Field(
        json_schema_extra=validations(
            cel(
                f"self == '' || ({label_key_rule('self')})",
                f"must be empty or a label key: {LABEL_KEY_HELP}",
                message_expression=f'"key " + self + " is not a label key: {LABEL_KEY_HELP}"',
            )
        )
    ),
]


class Toleration(ApiModel):
    """A pod toleration (same fields as core/v1 Toleration)."""

    key: TaintKey = Field(
        default="", description="Taint key the toleration applies to; empty matches all keys."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: LabelValue = Field(
        default="", description="Taint value to match with operator Equal (a label value)."
    )
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        default="", description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=0,
        le=31_536_000,
        description="How long a NoExecute taint is tolerated, in seconds (at most a year).",
    )


class ComputeResources(ApiModel):
    """CPU, memory and accelerators for a pipeline task or a model server, plus placement."""

    cpu: Quantity = Field(default="1", description="CPU request and limit, e.g. 500m or 2.")
    memory: Quantity = Field(default="2Gi", description="Memory request and limit, e.g. 4Gi.")
    gpu: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Number of GPUs (0 to 16). Over the namespace budget, work waits in Queued.",
    )
    gpu_resource: Annotated[
        str, StringConstraints(max_length=63, pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    ] = Field(default="nvidia.com/gpu", description="Extended resource name of the accelerator.")
    accelerator_type: Annotated[str, StringConstraints(max_length=63)] = Field(
        default="",
        description="A specific accelerator resource for the train/tune tasks (KFP's "
        "set_accelerator_type writes it into the pod's limits), e.g. nvidia.com/mig-1g.10gb; "
        "empty uses gpuResource. Pick a GPU model with nodeSelector.",
    )
    node_selector: LabelMap = Field(
        default_factory=dict,
        description="Node labels the pods must match: label keys (e.g. nvidia.com/gpu.product) "
        "and label values, at most 64.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=16, description="Taints the pods tolerate."
    )
    queue_name: DNSLabel | None = Field(
        default=None, description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label."
    )
