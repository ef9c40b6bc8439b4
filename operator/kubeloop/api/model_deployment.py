"""ModelDeployment: serve a model and roll new versions out as a metric-gated canary."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from kubeloop.api.base import (
    ApiModel,
    CRDInfo,
    DNSLabel,
    PositiveDuration,
    PrinterColumn,
    Resource,
    ShortText,
    StatusBase,
    cel,
    ready_columns,
    validations,
)
from kubeloop.api.common import ComputeResources, LocalRef
from kubeloop.api.model_version import Alias

PromQL = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
# The largest magnitude a PromQL result is compared with (bytes of memory, counts, seconds…).
PROMQL_BOUND = 10**15


class AliasRef(ApiModel):
    """A model name and one of its aliases, resolved by the registry."""

    model_name: DNSLabel = Field(description="Registered model name.")
    alias: Alias = Field(default="production", description="Alias to follow.")


class ModelSource(ApiModel):
    """Which model to serve: exactly one of modelVersion, alias or trainingRun."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "(has(self.modelVersion) ? 1 : 0) + (has(self.alias) ? 1 : 0) + "
                "(has(self.trainingRun) ? 1 : 0) == 1",
                "set exactly one of modelVersion, alias or trainingRun",
            ),
        )
    }

    model_version: LocalRef | None = Field(default=None, description="A ModelVersion by name.")
    alias: AliasRef | None = Field(
        default=None, description="Follow an alias; a move starts a rollout."
    )
    training_run: LocalRef | None = Field(
        default=None, description="Serve whatever this TrainingRun registers last."
    )


class Batching(ApiModel):
    """Server-side dynamic batching."""

    enabled: bool = Field(default=False, description="Batch concurrent requests.")
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Largest batch.")
    max_latency_ms: int = Field(
        default=5, ge=1, le=10000, description="Longest a request waits for a batch to fill."
    )


class ResponseCache(ApiModel):
    """An in-memory response cache keyed by the request payload."""

    enabled: bool = Field(default=False, description="Cache responses.")
    max_entries: int = Field(default=10000, ge=1, le=10**7, description="Cache size.")
    ttl_seconds: int = Field(default=300, ge=1, le=86400, description="Entry lifetime.")


class RequestLog(ApiModel):
    """The served requests kept as training data (Parquet under the tenant's prefix)."""

    enabled: bool = Field(default=True, description="Log sampled requests and their labels.")
    sample_rate: float = Field(
        default=1.0, ge=0, le=1, description="Share of requests logged (0..1)."
    )
    max_rows: int = Field(
        default=1_000_000, ge=1, le=10**9, description="Rows kept; older files are removed."
    )
    flush_interval: PositiveDuration = Field(
        default="30s",
        description="Longest time between a logged row and its Parquet file (at least 1s): a "
        "retrain reads only what was written, so keep it well below the DriftPolicy's for.",
    )


class Monitoring(ApiModel):
    """What the runtime records for drift and retraining."""

    request_log: RequestLog = Field(default_factory=RequestLog, description="Request log.")
    feedback_ttl: PositiveDuration = Field(
        default="1h",
        description="How long a prediction waits for its ground-truth label (POST .../feedback "
        "with the request id); at least 1s.",
    )


class Serving(ApiModel):
    """How the model is served."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.minReplicas <= self.maxReplicas",
                "minReplicas must be <= maxReplicas",
                field_path=".minReplicas",
            ),
        )
    }

    backend: Literal["default", "local", "kserve"] = Field(
        default="default",
        description="local (embedded server) or kserve; default follows the operator's setting.",
    )
    deployment_mode: Literal["Serverless", "RawDeployment"] = Field(
        default="RawDeployment", description="KServe deployment mode."
    )
    protocol: Literal["v1", "v2"] = Field(
        default="v2",
        description="The protocol clients use: status.url is its endpoint and readiness "
        "checks its route (the runtime answers both).",
    )
    grpc: bool = Field(default=False, description="Also serve the V2 gRPC protocol.")
    resources: ComputeResources = Field(
        default_factory=ComputeResources, description="Per-replica resources."
    )
    min_replicas: int = Field(default=1, ge=0, le=100, description="Fewest replicas.")
    max_replicas: int = Field(default=1, ge=1, le=100, description="Most replicas.")
    scale_metric: Literal["concurrency", "rps", "cpu"] = Field(
        default="concurrency", description="Autoscaling signal."
    )
    scale_target: int = Field(default=8, ge=1, le=10000, description="Target per replica.")
    batching: Batching = Field(default_factory=Batching, description="Dynamic batching.")
    cache: ResponseCache = Field(default_factory=ResponseCache, description="Response cache.")
    monitoring: Monitoring = Field(
        default_factory=Monitoring, description="Request log and label feedback."
    )


class CustomMetric(ApiModel):
    """A tenant PromQL check; the operator scopes it to this namespace."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel("has(self.min) || has(self.max)", "set min, max or both"),
            cel("!has(self.min) || !has(self.max) || self.min <= self.max", "min must be <= max"),
        )
    }

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9-]*$")
    ] = Field(description="Name shown in the analysis results.")
    query: PromQL = Field(
        description="PromQL returning one value; {{version}} is replaced "
        "by the version under analysis."
    )
    min: float | None = Field(
        default=None, ge=-PROMQL_BOUND, le=PROMQL_BOUND, description="Lowest healthy value."
    )
    max: float | None = Field(
        default=None, ge=-PROMQL_BOUND, le=PROMQL_BOUND, description="Highest healthy value."
    )


class Analysis(ApiModel):
    """Health checks run against the canary at each step."""

    max_error_rate: float = Field(
        default=0.01, ge=0, le=1, description="Highest 5xx fraction allowed."
    )
    max_p99_latency_ms: float = Field(
        default=500, gt=0, le=600000, description="Highest p99 latency allowed."
    )
    max_prediction_shift: float | None = Field(
        default=0.25,
        ge=0,
        le=10,
        description="Highest PSI between canary and stable prediction distributions.",
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        le=10**7,
        description="Fewest canary requests in a step for a verdict; "
        "fewer is inconclusive and holds the step.",
    )
    failure_limit: int = Field(
        default=2, ge=1, le=100, description="Failed checks before rollback."
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Compare the canary's labelled quality (labels fed back to the runtime) "
        "with the stable's, both over the rollout so far (labels arrive late, so they "
        "accumulate across steps): classification fails when the canary's accuracy is below "
        "the stable's minus this (in accuracy points, e.g. 0.02); regression fails when the "
        "canary's MAE is above the stable's times (1 + this). Unset: no such check.",
    )
    min_labelled_rows: int = Field(
        default=50,
        ge=1,
        le=10**9,
        description="Fewest labelled rows on each side (canary and stable) for a verdict on "
        "maxAccuracyDrop; fewer is inconclusive and holds the step.",
    )
    metrics: list[CustomMetric] = Field(
        default_factory=list, max_length=16, description="Extra PromQL checks."
    )


class Rollout(ApiModel):
    """How a new version replaces the stable one."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.strategy != 'canary' || size(self.steps) > 0",
                "a canary needs at least one step",
                field_path=".steps",
            ),
            cel(
                "self.approval != 'manual' || (self.strategy == 'canary' && size(self.steps) > 1)",
                "approval: manual holds the canary at the step before the last: it needs "
                "strategy canary and at least two steps",
                field_path=".approval",
            ),
        )
    }

    strategy: Literal["canary", "immediate"] = Field(
        default="canary", description="canary or immediate."
    )
    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [10, 25, 50, 100],
        max_length=20,
        json_schema_extra=validations(
            cel(
                "self.isSorted() && self.all(p, self.exists_one(q, q == p))",
                "steps must be strictly increasing",
            ),
            cel("size(self) == 0 || self[size(self) - 1] == 100", "steps must end at 100"),
        ),
        description="Canary traffic percentages, strictly increasing, ending at 100.",
    )
    interval: PositiveDuration = Field(
        default="60s", description="Time between analyses (at least 1s)."
    )
    max_duration: PositiveDuration = Field(
        default="2h",
        description="Roll back a canary not promoted after this long (at least 1s); a wait for "
        "approval does not count.",
    )
    approval: Literal["none", "manual"] = Field(
        default="none",
        description="manual: a canary that passed the analysis of the step before the last "
        "holds there (phase Progressing, condition Progressing reason AwaitingApproval; its "
        "analysis goes on, so it can still roll back) for as long as it takes, until the "
        "ModelDeployment is annotated kubeloop.dev/approve=<the canary's ModelVersion> (or "
        "true); then it takes the last step and is promoted as usual, and the operator "
        "removes the annotation. manualAction still promotes or aborts while it waits.",
    )
    analysis: Analysis = Field(default_factory=Analysis, description="Health checks.")
    promote_alias: Alias | None = Field(
        default=None,
        description="Alias the registry moves to a version once it is promoted (default: "
        "the operator's promoteAlias setting, production).",
    )


class ModelDeploymentSpec(ApiModel):
    """A served model and its rollout policy."""

    model: ModelSource = Field(description="Model to serve.")
    serving: Serving = Field(default_factory=Serving, description="Serving configuration.")
    rollout: Rollout = Field(default_factory=Rollout, description="Rollout policy.")
    paused: bool = Field(default=False, description="Hold the rollout at its current step.")
    manual_action: Literal["none", "promote", "abort"] = Field(
        default="none", description="promote now or abort now; reset to none when done."
    )


class VersionWeight(ApiModel):
    """A served version and its traffic share."""

    model_version: DNSLabel | None = Field(default=None, description="ModelVersion name.")
    weight: int = Field(default=0, ge=0, le=100, description="Traffic percent.")


class AnalysisResult(ApiModel):
    """One health check at one step."""

    step: int = Field(ge=0, description="Step index.")
    check: ShortText = Field(
        description="requests, errorRate, p99LatencyMs, predictionShift, labelledRows, "
        "labelledAccuracyDrop or a custom metric's name."
    )
    value: float | None = Field(default=None, description="Measured value (none: no data).")
    verdict: Literal["Pass", "Fail", "Inconclusive"] = Field(description="Outcome.")
    time: ShortText = Field(default="", description="When measured.")


class RolloutRecord(ApiModel):
    """A finished rollout."""

    from_version: ShortText = Field(default="", description="Stable before.")
    to_version: ShortText = Field(default="", description="Canary.")
    result: Literal["Promoted", "RolledBack", "Aborted", "Superseded"] = Field(
        description="Outcome."
    )
    reason: ShortText = Field(default="", description="Why.")
    finished_at: ShortText = Field(default="", description="When.")


class ModelDeploymentStatus(StatusBase):
    """What is served and how the rollout stands."""

    phase: Literal[
        "", "Pending", "Serving", "Progressing", "Paused", "Promoted", "RolledBack", "Failed"
    ] = Field(default="", description="Summary.")
    stable: VersionWeight = Field(default_factory=VersionWeight, description="Stable version.")
    canary: VersionWeight = Field(default_factory=VersionWeight, description="Canary version.")
    current_step: int = Field(default=0, ge=0, description="Index into spec.rollout.steps.")
    step_started_at: ShortText = Field(default="", description="When the step began.")
    rollout_started_at: ShortText = Field(default="", description="When this rollout began.")
    failed_checks: int = Field(default=0, ge=0, description="Failed analyses this rollout.")
    approval_requested_at: ShortText = Field(
        default="",
        description="When the canary began waiting for approval (rollout.approval: manual).",
    )
    approved_at: ShortText = Field(
        default="", description="When the canary was approved to take the last step."
    )
    analysis: list[AnalysisResult] = Field(
        default_factory=list, max_length=64, description="Latest analysis results."
    )
    history: list[RolloutRecord] = Field(
        default_factory=list, max_length=20, description="Finished rollouts, newest last."
    )
    url: Annotated[str, StringConstraints(max_length=512)] = Field(
        default="", description="Inference endpoint."
    )


class ModelDeployment(Resource):
    crd = CRDInfo(
        kind="ModelDeployment",
        plural="modeldeployments",
        short_names=("md",),
        description="Serves a model and rolls new versions out as a Prometheus-gated canary.",
        columns=(
            PrinterColumn("Stable", ".status.stable.modelVersion"),
            PrinterColumn("Canary", ".status.canary.modelVersion"),
            PrinterColumn("Weight", ".status.canary.weight", type="integer"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("URL", ".status.url", priority=1),
            *ready_columns(),
        ),
    )
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus = Field(default_factory=ModelDeploymentStatus)
