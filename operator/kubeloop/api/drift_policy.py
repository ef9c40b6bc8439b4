"""DriftPolicy: drift signals from Prometheus; a breach long enough acts (observe, notify, retrain).

A policy watches the *stable* version of one ModelDeployment in its own namespace. Every
``interval`` it evaluates its signals over ``window``; a breach that holds for ``for`` acts
according to ``action.mode``; a retrain creates a TrainingRun whose new version the deployment
canaries. Once a retrained version is promoted the policy compares against its reference.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, StrictFloat, StringConstraints, WithJsonSchema, model_validator

from kubeloop.api.base import (
    ApiModel,
    CRDInfo,
    Duration,
    PositiveDuration,
    PrinterColumn,
    Resource,
    ShortText,
    StatusBase,
    cel,
    ready_columns,
    validations,
    value_validations,
)
from kubeloop.api.common import LocalRef
from kubeloop.api.model_deployment import PROMQL_BOUND, PromQL

# Per-feature statistics (planning/drift.py); also the statistic of a prediction signal.
FEATURE_SIGNALS: Final = ("psi", "kl", "js", "ks", "wasserstein", "chisquare")
# Labelled outcomes from the serving runtime's feedback counters.
CONCEPT_SIGNALS: Final = ("accuracy", "f1", "mae", "rmse")
SignalType = Literal[
    "psi", "kl", "js", "ks", "wasserstein", "chisquare",
    "prediction", "accuracy", "f1", "mae", "rmse", "promql",
]  # fmt: skip
Statistic = Literal["psi", "kl", "js", "ks", "wasserstein", "chisquare"]

# Statistics that lie in 0..1, so a threshold above 1 could never breach.
FRACTION_SIGNALS: Final = ("accuracy", "f1", "js", "ks")

# A number or the word auto. Kubernetes' schema dialect has no number-or-string type (int-or-
# string refuses 0.2) and CEL cannot see an untyped field (the CRD is refused: "undefined field
# 'threshold'"), so the value is kept as given (x-kubernetes-preserve-unknown-fields) and held
# by OpenAPI value validations, which apply by the value's own type: a number must be in
# 0..PROMQL_BOUND, a string must be auto, minItems > maxItems (minProperties > maxProperties)
# refuses every list (map) and not-enum every boolean. The model refuses the same (strictly: no
# "0.2" or true coerced to a number), and what the schema cannot say: auto for f1, mae, rmse,
# promql (an anyOf could, but its message would not say why), and null.
Threshold = Annotated[
    StrictFloat | Literal["auto"],
    WithJsonSchema(
        {
            "x-kubernetes-preserve-unknown-fields": True,
            "description": "A number >= 0, or auto.",
            "minimum": 0,
            "maximum": PROMQL_BOUND,
            "pattern": "^auto$",
            "maxLength": 4,
            "minItems": 1,
            "maxItems": 0,
            "minProperties": 1,
            "maxProperties": 0,
            "not": {"enum": [True, False]},
        }
    ),
]


class Signal(ApiModel):
    """One drift signal and its threshold."""

    model_config = ApiModel.model_config | {
        # The type decides the threshold's range, and CEL cannot see the threshold: an anyOf
        # does it (a fraction's threshold is at most 1). The threshold branch comes first so
        # that the API server's message names spec.signals[i].threshold and its bound.
        "json_schema_extra": value_validations(
            anyOf=[
                {"properties": {"threshold": {"maximum": 1}}},
                {"properties": {"type": {"not": {"enum": list(FRACTION_SIGNALS)}}}},
            ]
        )
        | validations(
            cel(
                "self.type != 'promql' || has(self.query)",
                "a promql signal needs query",
                field_path=".query",
            ),
            cel(
                "self.type == 'promql' || !has(self.query)",
                "query is only for promql signals",
                field_path=".query",
            ),
            cel(
                "!(self.type in ['psi', 'kl', 'js', 'ks', 'wasserstein', 'chisquare']) || "
                "has(self.feature)",
                "per-feature signals need feature (a feature name, or * for every feature)",
                field_path=".feature",
            ),
            cel(
                "self.type in ['psi', 'kl', 'js', 'ks', 'wasserstein', 'chisquare'] || "
                "!has(self.feature)",
                "feature is only for per-feature signals (psi, kl, js, ks, wasserstein, chisquare)",
                field_path=".feature",
            ),
            cel(
                "!has(self.share) || (has(self.feature) && self.feature == '*')",
                "share applies to feature: '*' only",
                field_path=".share",
            ),
            cel(
                "self.type == 'prediction' || !has(self.statistic)",
                "statistic is only for prediction signals (per-feature signals name it in type)",
                field_path=".statistic",
            ),
            cel(
                "self.type == 'promql' || !has(self.comparison)",
                "comparison is only for promql signals (the others know their direction)",
                field_path=".comparison",
            ),
        )
    }

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9-]*$")
    ] = Field(description="Signal name shown in status.")
    type: SignalType = Field(
        description="psi/kl/js/ks/wasserstein/chisquare per feature against the served "
        "version's training reference; prediction (the served prediction histogram against "
        "the validation-time one); accuracy, f1 (macro), mae, rmse from fed-back labels "
        "(concept drift; breach when accuracy/f1 fall below or mae/rmse rise above); "
        "or promql."
    )
    feature: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        default=None,
        description="Feature name, or * for every feature: the worst one breaches (or, with "
        "share, the share of drifted features).",
    )
    share: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="With feature '*': breach when at least this share of the features drift "
        "(Evidently's dataset drift), instead of when the worst one does.",
    )
    statistic: Statistic | None = Field(
        default=None, description="Prediction signals: the statistic (default psi)."
    )
    query: PromQL | None = Field(
        default=None,
        description="PromQL (promql signals); scoped to this namespace, refused if it names "
        "another. $version is the served stable version.",
    )
    threshold: Threshold = Field(
        description="A number >= 0 (at most 1 for accuracy, f1, js, ks), or auto (calibrated "
        "from the reference at the window's sample size so that a stream without drift "
        "breaches at most falseAlarmRate of its evaluations; accuracy: the evaluated accuracy "
        "less what sampling at the window's labelled rows explains; not for f1, mae, rmse, "
        "promql). The schema has no number-or-string type: the API server refuses negative "
        "or oversized numbers, strings other than auto, lists and maps; the operator also "
        "refuses auto where it does not apply, with Ready=False."
    )
    comparison: Literal["above", "below"] | None = Field(
        default=None,
        description="promql only: above (breach when value > threshold, the default) or below.",
    )
    min_count: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        description="Fewest rows (labelled rows for accuracy/f1/mae/rmse) a window needs to be "
        "conclusive; below it the value is recorded, never a breach nor a pass. Default 100 "
        "(50 labelled rows).",
    )
    false_alarm_rate: float = Field(
        default=0.01,
        gt=0,
        le=0.2,
        description="threshold auto: the share of evaluations a stream without drift may breach.",
    )

    @model_validator(mode="after")
    def _threshold_in_range(self) -> Signal:
        t = self.threshold
        if t == "auto":
            if self.type in ("f1", "mae", "rmse", "promql"):
                raise ValueError(
                    f"threshold: auto is not available for {self.type} signals (nothing to "
                    "calibrate it from); give a number"
                )
        elif not 0 <= t <= PROMQL_BOUND:
            raise ValueError(
                f"threshold {t}: expected a number >= 0 (at most {PROMQL_BOUND:g}), or auto"
            )
        elif self.type in FRACTION_SIGNALS and t > 1:
            raise ValueError(f"threshold {t}: a {self.type} lies in 0..1; expected 0 <= t <= 1")
        return self


class RetrainAction(ApiModel):
    """What a breach that held for ``for`` does."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.mode == 'retrain' || !self.dryRun",
                "dryRun applies to mode retrain",
                field_path=".dryRun",
            ),
        )
    }

    mode: Literal["observe", "notify", "retrain"] = Field(
        default="retrain",
        description="observe: status only; notify: also Warning Events and the "
        "kubeloop_drift_breached metric; retrain: also create a TrainingRun.",
    )
    dry_run: bool = Field(
        default=False,
        description="retrain: render the TrainingRun it would create into "
        "status.dryRunTrainingRun instead of creating it.",
    )
    template: LocalRef | None = Field(
        default=None,
        description="TrainingRun to copy (default: the one in the served version's lineage).",
    )
    data: Literal["template", "served", "both"] = Field(
        default="both",
        description="Training data of the retrain: the template's; served: the labelled rows "
        "the deployment logged (its request log) since the breach began (the first breaching "
        "evaluation, or one interval before it when for is shorter than interval; at most "
        "window back); or both.",
    )
    cooldown: PositiveDuration = Field(
        default="6h", description="Least time between two retrains (at least 1s)."
    )
    max_retrains_per_day: int = Field(
        default=2, ge=0, le=24, description="Retrains started in any 24 hours, at most."
    )
    approval: Literal["none", "manual"] = Field(
        default="none",
        description="manual: the TrainingRun is created suspended until "
        "`kubectl annotate trainingrun NAME kubeloop.dev/approve=true`.",
    )


class DriftPolicySpec(ApiModel):
    """Drift signals on a deployment and what a breach does."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.signals.all(s, self.signals.exists_one(t, t.name == s.name))",
                "signal names must be unique",
                field_path=".signals",
            ),
            cel(
                "duration(self.window) >= duration(self.interval)",
                "window must be at least interval (every row is then evaluated)",
                field_path=".window",
            ),
        )
    }

    target: LocalRef = Field(description="ModelDeployment to watch (in this namespace).")
    signals: list[Signal] = Field(min_length=1, max_length=32, description="Drift signals.")
    interval: PositiveDuration = Field(
        default="60s", description="Evaluation period (at least 1s)."
    )
    window: PositiveDuration = Field(
        default="1h", description="Data window of each evaluation (at least interval)."
    )
    for_: Duration = Field(
        default="5m",
        alias="for",
        description="How long consecutive conclusive breaches must last before acting, as a "
        "Prometheus alert's for (0s: act on the first; so, unlike the other durations, it may "
        "be shorter than 1s).",
    )
    action: RetrainAction = Field(default_factory=RetrainAction, description="Action.")
    suspend: bool = Field(default=False, description="Evaluate but do not act.")


Outcome = Literal["Breach", "Pass", "Inconclusive"]
Phase = Literal[
    "", "Watching", "Pending", "Drifted", "Retraining", "AwaitingApproval", "Cooldown",
    "Suspended", "Failed",
]  # fmt: skip


class SignalValue(ApiModel):
    """Latest evaluation of one signal."""

    name: ShortText = Field(description="Signal name.")
    value: float | None = Field(default=None, description="Value (none: nothing to compute).")
    threshold: float | None = Field(default=None, description="Threshold it was held to.")
    count: float | None = Field(
        default=None, description="Rows (or labelled rows) the window held."
    )
    outcome: Outcome = Field(default="Inconclusive", description="Breach, Pass or Inconclusive.")
    feature: ShortText = Field(default="", description="feature '*': the worst feature.")
    message: ShortText = Field(default="", description="Why inconclusive, or what breached.")
    since: ShortText = Field(default="", description="Breaching since.")


class FeatureScore(ApiModel):
    """One drifted feature."""

    feature: ShortText = Field(description="Feature name.")
    statistic: ShortText = Field(description="Statistic.")
    value: float = Field(description="Value.")
    threshold: float = Field(description="Threshold.")


class EvaluationRecord(ApiModel):
    """One evaluation, for the history."""

    time: ShortText = Field(description="When evaluated.")
    outcome: Outcome = Field(description="Breach, Pass or Inconclusive.")
    score: ShortText = Field(default="", description="The worst signal, e.g. psi[amount]=0.31.")


class RetrainRecord(ApiModel):
    """One retrain the policy started, and what became of it."""

    training_run: ShortText = Field(description="TrainingRun created.")
    model_version: ShortText = Field(default="", description="ModelVersion it registered.")
    started_at: ShortText = Field(description="When created.")
    finished_at: ShortText = Field(default="", description="When its outcome was known.")
    outcome: Literal[
        "Training",
        "AwaitingApproval",
        "RollingOut",
        "Promoted",
        "RolledBack",
        "GatesFailed",
        "Failed",
    ] = Field(default="Training", description="Where it stands.")
    reason: ShortText = Field(default="", description="The breach that started it.")


class DriftPolicyStatus(StatusBase):
    """Latest evaluation, the breach clock and the retrains."""

    phase: Phase = Field(default="", description="Summary.")
    baseline_version: ShortText = Field(
        default="", description="ModelVersion whose reference the signals compare against."
    )
    signals: list[SignalValue] = Field(
        default_factory=list, max_length=32, description="Latest values."
    )
    top_features: list[FeatureScore] = Field(
        default_factory=list, max_length=10, description="Most drifted features, worst first."
    )
    drift_score: ShortText = Field(default="", description="Worst signal, e.g. psi=0.31.")
    last_evaluated_at: ShortText = Field(default="", description="Last evaluation.")
    breaching_since: ShortText = Field(
        default="", description="First of the current run of breaching evaluations."
    )
    history: list[EvaluationRecord] = Field(
        default_factory=list, max_length=30, description="Recent evaluations, newest last."
    )
    retrains: list[RetrainRecord] = Field(
        default_factory=list, max_length=20, description="Retrains, newest last."
    )
    retrain_count: int = Field(default=0, ge=0, description="Retrains ever started.")
    last_retrain_at: ShortText = Field(default="", description="Last retrain started.")
    retrains_today: int = Field(default=0, ge=0, description="Retrains in the last 24 h.")
    active_training_run: ShortText = Field(default="", description="Retrain in flight.")
    dry_run_training_run: Annotated[str, StringConstraints(max_length=65536)] = Field(
        default="", description="action.dryRun: the TrainingRun a retrain would create (JSON)."
    )


class DriftPolicy(Resource):
    crd = CRDInfo(
        kind="DriftPolicy",
        plural="driftpolicies",
        short_names=("dp",),
        description="Watches drift signals of a served model and retrains it on a breach.",
        columns=(
            PrinterColumn("Target", ".spec.target.name"),
            PrinterColumn("Baseline", ".status.baselineVersion"),
            PrinterColumn("Drift", ".status.driftScore"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Retrain", ".status.activeTrainingRun"),
            *ready_columns(),
        ),
    )
    spec: DriftPolicySpec
    status: DriftPolicyStatus = Field(default_factory=DriftPolicyStatus)
