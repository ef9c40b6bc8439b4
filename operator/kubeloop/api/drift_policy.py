"""DriftPolicy: drift signals from Prometheus; a breach long enough triggers a retrain."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from kubeloop.api.base import (
    ApiModel,
    CRDInfo,
    Duration,
    PrinterColumn,
    Resource,
    ShortText,
    StatusBase,
    cel,
    ready_columns,
    validations,
)
from kubeloop.api.common import LocalRef
from kubeloop.api.model_deployment import PromQL

FEATURE_SIGNALS = ("psi", "kl", "ks", "js")


class Signal(ApiModel):
    """One drift signal and its threshold."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
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
                "!(self.type in ['psi', 'kl', 'ks', 'js']) || has(self.feature)",
                "psi, kl, ks and js signals need feature ('*' for every feature)",
                field_path=".feature",
            ),
        )
    }

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9-]*$")
    ] = Field(description="Signal name shown in status.")
    type: Literal["psi", "kl", "ks", "js", "prediction", "accuracy", "promql"] = Field(
        description="psi/kl/ks/js per feature, prediction drift, labelled accuracy, or PromQL."
    )
    feature: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        default=None, description="Feature name, or * for the worst feature."
    )
    query: PromQL | None = Field(
        default=None, description="PromQL (promql signals); scoped to this namespace."
    )
    threshold: float = Field(description="Breach threshold.")
    comparison: Literal["above", "below"] = Field(
        default="above",
        description="above: breach when value > threshold (drift scores); "
        "below: breach when value < threshold (accuracy).",
    )


class RetrainAction(ApiModel):
    """What to do on a breach."""

    type: Literal["retrain", "alert"] = Field(
        default="retrain", description="retrain, or only alert."
    )
    template: LocalRef | None = Field(
        default=None,
        description="TrainingRun to copy for retraining (default: the one that "
        "produced the deployed model).",
    )
    cooldown: Duration = Field(default="6h", description="Least time between retrains.")
    max_retrains_per_day: int = Field(default=2, ge=0, le=24, description="Daily cap.")
    approval: Literal["none", "manual"] = Field(
        default="none", description="manual: create the run suspended until approved."
    )


class DriftPolicySpec(ApiModel):
    """Drift signals on a deployment and the retraining they trigger."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.signals.all(s, self.signals.exists_one(t, t.name == s.name))",
                "signal names must be unique",
                field_path=".signals",
            ),
        )
    }

    target: LocalRef = Field(description="ModelDeployment to watch.")
    signals: list[Signal] = Field(min_length=1, max_length=32, description="Drift signals.")
    interval: Duration = Field(default="60s", description="Evaluation period.")
    window: Duration = Field(default="1h", description="Data window of each evaluation.")
    for_: Duration = Field(
        default="5m", alias="for", description="How long a breach must last before acting."
    )
    action: RetrainAction = Field(default_factory=RetrainAction, description="Action.")
    suspend: bool = Field(default=False, description="Evaluate but do not act.")


class SignalValue(ApiModel):
    """Latest value of one signal."""

    name: ShortText = Field(description="Signal name.")
    value: float | None = Field(default=None, description="Value (none: inconclusive).")
    breached: bool = Field(default=False, description="Over threshold now.")
    since: ShortText = Field(default="", description="Breaching since.")


class DriftPolicyStatus(StatusBase):
    """Latest evaluation and retrain bookkeeping."""

    phase: Literal["", "Watching", "Drifted", "Retraining", "Cooldown", "Suspended", "Failed"] = (
        Field(default="", description="Summary.")
    )
    signals: list[SignalValue] = Field(
        default_factory=list, max_length=32, description="Latest values."
    )
    drift_score: ShortText = Field(default="", description="Worst signal, e.g. psi=0.31.")
    last_evaluated_at: ShortText = Field(default="", description="Last evaluation.")
    last_retrain_at: ShortText = Field(default="", description="Last retrain started.")
    retrains_today: int = Field(default=0, ge=0, description="Retrains in the last 24 h.")
    active_training_run: ShortText = Field(default="", description="Retrain in flight.")


class DriftPolicy(Resource):
    crd = CRDInfo(
        kind="DriftPolicy",
        plural="driftpolicies",
        short_names=("dp",),
        description="Watches drift signals and retrains the deployed model on a breach.",
        columns=(
            PrinterColumn("Target", ".spec.target.name"),
            PrinterColumn("Drift", ".status.driftScore"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Retrain", ".status.activeTrainingRun"),
            *ready_columns(),
        ),
    )
    spec: DriftPolicySpec
    status: DriftPolicyStatus = Field(default_factory=DriftPolicyStatus)
