"""ModelVersion: the registry's immutable record of one trained model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from kubeloop.api.base import (
    ApiModel,
    CRDInfo,
    DNSLabel,
    LongText,
    MetricName,
    PrinterColumn,
    Resource,
    ShortText,
    StatusBase,
    cel,
    immutable,
    ready_columns,
    validations,
)

Alias = Literal["latest", "candidate", "production", "staging"]
ARTIFACT_URI_PATTERN = r"^(file:///|s3://[a-z0-9][a-z0-9.-]{1,62}/|gs://[a-z0-9][a-z0-9._-]{1,62}/|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/)[^\s]*$"


class Artifact(ApiModel):
    """Where the model's files are and how to load them."""

    uri: Annotated[
        str, StringConstraints(min_length=8, max_length=1024, pattern=ARTIFACT_URI_PATTERN)
    ] = Field(
        description="Location of the model directory: file:///abs/path, s3://bucket/key, "
        "gs://bucket/key or pvc://claim-name/path (a claim in this namespace)."
    )
    format: Literal["torch", "torchscript", "onnx", "sklearn"] = Field(
        default="torch", description="Serialisation format the serving runtime loads."
    )
    sha256: Annotated[str, StringConstraints(pattern=r"^[a-f0-9]{64}$", max_length=64)] | None = (
        Field(default=None, description="Digest of the model file; verified when readable.")
    )
    size_bytes: int | None = Field(default=None, ge=0, description="Size of the artifact.")


class TensorSpec(ApiModel):
    """One named input or output of the model."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="Feature or output name."
    )
    dtype: Literal["float32", "float64", "int64", "int32", "bool", "string"] = Field(
        default="float32", description="Element type."
    )
    shape: list[Annotated[int, Field(ge=-1, le=2**31 - 1)]] = Field(
        default_factory=list,
        max_length=8,
        description="Shape without the batch dimension; -1 for variable.",
    )


class Signature(ApiModel):
    """The model's input and output contract, checked when a deployment switches versions."""

    inputs: list[TensorSpec] = Field(
        default_factory=list,
        max_length=1024,
        description="Inputs in the order the model expects them.",
    )
    outputs: list[TensorSpec] = Field(default_factory=list, max_length=64, description="Outputs.")


ReportUri = Annotated[
    str, StringConstraints(min_length=8, max_length=1024, pattern=ARTIFACT_URI_PATTERN)
]


class Lineage(ApiModel):
    """Where the model came from."""

    training_run: DNSLabel | None = Field(default=None, description="TrainingRun that produced it.")
    pipeline_run_id: ShortText | None = Field(
        default=None, description="Executor's run id (KFP or local)."
    )
    dataset_uri: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="Dataset the model was trained on."
    )
    dataset_sha256: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None, description="Digest of the dataset snapshot."
    )
    parent_version: DNSLabel | None = Field(
        default=None, description="ModelVersion this one retrains or distils."
    )
    spec_hash: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None, description="Hash of the compiled pipeline that trained it."
    )
    report_uri: ReportUri | None = Field(
        default=None,
        description="The training run's explanation and evaluation report (one self-contained "
        "HTML file: metrics, confusion matrix, learning curves, importances, partial "
        "dependence, LIME, counterfactuals, optimisation decisions).",
    )


class HistogramReference(ApiModel):
    """A training-time histogram: bucket edges and the fraction of rows in each bucket."""

    edges: list[float] = Field(
        default_factory=list,
        max_length=65,
        description="Bucket edges, ascending (at most 64 buckets).",
    )
    fractions: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=list,
        max_length=65,
        description="Fraction of rows per bucket, then (when present) the share of missing "
        "values: as many entries as edges.",
    )
    rows: int | None = Field(
        default=None,
        ge=0,
        le=10**12,
        description="Rows the histogram was counted from (drift thresholds treat the "
        "reference as a sample of this size).",
    )


class FeatureReference(HistogramReference):
    """Training distribution of one feature: histogram edges and fractions, for drift."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="Feature name."
    )


class ModelVersionSpec(ApiModel):
    """An immutable model record. Only aliases (and metadata labels) may change."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.modelName == oldSelf.modelName && self.version == oldSelf.version && "
                "self.artifact == oldSelf.artifact && self.task == oldSelf.task && "
                "self.framework == oldSelf.framework",
                "modelName, version, artifact, task and framework are immutable: "
                "register a new ModelVersion",
                reason="FieldValueForbidden",
            ),
        )
    }

    model_name: DNSLabel = Field(description="Registered model this version belongs to.")
    version: int = Field(ge=1, le=1_000_000, description="Version number, unique per model name.")
    artifact: Artifact = Field(description="The model files.")
    task: Literal["classification", "regression"] = Field(
        default="classification", description="What the model predicts."
    )
    framework: Literal["torch", "sklearn", "onnx"] = Field(
        default="torch", description="Framework that produced it."
    )
    metrics: Annotated[dict[MetricName, float], Field(max_length=64)] = Field(
        default_factory=dict,
        json_schema_extra=immutable("spec.metrics"),
        description="Evaluation metrics on the held-out test split, e.g. f1: 0.97.",
    )
    signature: Signature | None = Field(
        default=None,
        json_schema_extra=immutable("spec.signature"),
        description="Input/output contract.",
    )
    lineage: Lineage | None = Field(
        default=None, json_schema_extra=immutable("spec.lineage"), description="Provenance."
    )
    reference: list[FeatureReference] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra=immutable("spec.reference"),
        description="Training distribution of each feature (drift baseline).",
    )
    prediction_reference: HistogramReference | None = Field(
        default=None,
        json_schema_extra=immutable("spec.predictionReference"),
        description="Distribution of the model's prediction score on validation data "
        "(prediction-drift baseline).",
    )
    aliases: list[Alias] = Field(
        default_factory=list,
        max_length=4,
        json_schema_extra=validations(
            cel("self.all(a, self.exists_one(b, b == a))", "aliases must not repeat")
        ),
        description="Aliases this version claims. At most one version of a model holds each "
        "alias: the operator moves it from the previous holder.",
    )
    description: LongText = Field(default="", description="Free text.")


class ModelVersionStatus(StatusBase):
    """What the registry resolved."""

    phase: Literal["", "Pending", "Ready", "Failed"] = Field(default="", description="Summary.")
    aliases: list[Alias] = Field(
        default_factory=list, max_length=4, description="Aliases this version holds now."
    )
    primary_metric: Annotated[str, StringConstraints(max_length=64)] = Field(
        default="", description="The headline metric, e.g. f1=0.971 (for kubectl get)."
    )
    artifact_verified: bool = Field(
        default=False, description="The artifact was found and its digest matched."
    )


class ModelVersion(Resource):
    crd = CRDInfo(
        kind="ModelVersion",
        plural="modelversions",
        short_names=("mv",),
        description="An immutable record of a trained model: artifact, metrics, lineage, "
        "signature and aliases.",
        selectable_fields=(".spec.modelName",),
        columns=(
            PrinterColumn("Model", ".spec.modelName"),
            PrinterColumn("Version", ".spec.version", type="integer"),
            PrinterColumn("Aliases", ".status.aliases"),
            PrinterColumn("Metric", ".status.primaryMetric"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Artifact", ".spec.artifact.uri", priority=1),
            *ready_columns(),
        ),
    )
    spec: ModelVersionSpec
    status: ModelVersionStatus = Field(default_factory=ModelVersionStatus)
