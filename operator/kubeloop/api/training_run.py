"""TrainingRun: data, preprocessing, model, tuning, gates, explanation, optimisation."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Final, Literal, Self

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from kubeloop.api.base import (
    ApiModel,
    CRDInfo,
    DNSLabel,
    LabelMap,
    MetricName,
    PositiveDuration,
    PrinterColumn,
    Resource,
    SecretName,
    ShortText,
    StatusBase,
    cel,
    ready_columns,
    validations,
)
from kubeloop.api.common import ComputeResources
from kubeloop.api.model_version import Alias
from kubeloop.contract.evaluation import RANKING_METRICS
from kubeloop.contract.labels import APPROVE_ANNOTATION

DATA_URI_PATTERN = r"^(file:///|s3://|gs://|builtin://)[^\s]+$"
BUILTIN_DATASETS = ("breast-cancer", "digits", "diabetes", "fraud", "reviews", "ranking")
GateMetric = Literal[
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "pr_auc",
    "minority_recall",
    "mse",
    "rmse",
    "mae",
    "r2",
    "latency_ms",
    "size_mb",
    "map_at_k",
    "ndcg_at_k",
]
# Gate metrics that are fractions (0..1), and those that are never negative; r2 is at most 1.
FRACTION_METRICS: Final = (
    "accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "minority_recall",
    "map_at_k", "ndcg_at_k",
)  # fmt: skip
NON_NEGATIVE_METRICS: Final = ("mse", "rmse", "mae", "latency_ms", "size_mb")
# Five cron fields (minute hour day-of-month month day-of-week; names such as MON or JAN in
# the last two) or a macro. Whether the numbers are in range (61 * * * *) is judged in code.
CRON_HELP = (
    "five cron fields (minute hour day-of-month month day-of-week, e.g. '0 3 * * *' or "
    "'*/15 8-18 * * MON-FRI') or a macro (@hourly, @daily, @midnight, @weekly, @monthly, "
    "@yearly, @annually)"
)
CRON_PATTERN = (
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|"
    r"[0-9*/,?-]+\s+[0-9*/,?-]+\s+[0-9*/,?LW-]+\s+[0-9A-Za-z*/,?-]+\s+[0-9A-Za-z*/,?#-]+)$"
)


def _cron(text: str) -> str:
    if not re.fullmatch(CRON_PATTERN, text):
        raise ValueError(f"{text!r} is not a cron schedule: expected {CRON_HELP}")
    return text


CronSchedule = Annotated[
    str,
    StringConstraints(max_length=64),
    AfterValidator(_cron),
    Field(
        json_schema_extra=validations(
            cel(
                f"self.matches(r'{CRON_PATTERN}')",
                f"must be {CRON_HELP}",
                message_expression=f'self + " is not a cron schedule: expected {CRON_HELP}"',
            )
        )
    ),
]
ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
DataUri = Annotated[
    str, StringConstraints(min_length=10, max_length=1024, pattern=DATA_URI_PATTERN)
]
DataFormat = Literal["auto", "csv", "parquet", "images", "text", "requestLog"]
# RFC 3339 with an explicit offset (``Z`` or ``±hh:mm``), at most microseconds: the request
# log's resolution. The API server checks the shape; the model also checks the calendar.
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$"
)


def parse_timestamp(text: str) -> dt.datetime:
    """``2026-12-01T14:00:00Z`` (or with an offset) → a timezone-aware UTC datetime; raises
    ValueError naming the value for one that is not a real moment (e.g. month 13)."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an RFC 3339 time stamp; expected e.g. 2026-12-01T14:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; end it with Z or ±hh:mm")
    return moment.astimezone(dt.UTC)


def _timestamp(text: str) -> str:
    parse_timestamp(text)
    return text


Timestamp = Annotated[
    str,
    StringConstraints(max_length=32, pattern=TIMESTAMP_PATTERN),
    AfterValidator(_timestamp),
]
SINCE_DESCRIPTION = (
    "requestLog only: read just the rows served at or after this time (RFC 3339, e.g. "
    "2026-12-01T14:00:00Z); unset reads the whole log."
)


class Split(ApiModel):
    """How rows are split; seeded so a rerun sees the same rows."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.validation + self.test < 0.9",
                "validation + test must leave at least 10% of the rows for training",
            )
        )
    }

    validation: float = Field(default=0.15, gt=0, lt=0.5, description="Validation fraction.")
    test: float = Field(default=0.15, gt=0, lt=0.5, description="Held-out test fraction.")
    stratify: bool = Field(
        default=True,
        description="Keep class ratios in every split (classification; ignored with "
        "data.groupColumn, which splits whole groups instead).",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed.")


def _since_only_for_request_logs(*more: dict[str, str]) -> dict[str, Any]:
    return validations(
        cel(
            "!has(self.since) || self.format == 'requestLog'",
            "since selects rows of a request log by the time they were served; it applies only "
            "to format: requestLog",
            field_path=".since",
        ),
        *more,
    )


# The group column identifies rows (which query a document was shown for); it is never an input
# of the model nor what it predicts.
GROUP_COLUMN_RULES: Final = (
    cel(
        "!has(self.groupColumn) || self.groupColumn != self.target",
        "groupColumn names the query/group id; it cannot also be the target",
        field_path=".groupColumn",
    ),
    cel(
        "!has(self.groupColumn) || !has(self.features) || !(self.groupColumn in self.features)",
        "groupColumn is never fed to the model: leave it out of data.features",
        field_path=".groupColumn",
    ),
)


class ExtraData(ApiModel):
    """More rows appended after the main source's, read with its target, features and task."""

    model_config = ApiModel.model_config | {"json_schema_extra": _since_only_for_request_logs()}

    uri: DataUri = Field(description="Where the rows are, as data.uri.")
    format: DataFormat = Field(default="auto", description="File format, as data.format.")
    since: Timestamp | None = Field(default=None, description=SINCE_DESCRIPTION)


class DataSource(ApiModel):
    """Where the training data is and what to predict."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": _since_only_for_request_logs(*GROUP_COLUMN_RULES)
    }

    uri: DataUri = Field(
        description="file:///path.csv, s3://bucket/key.parquet, gs://…, or builtin://NAME "
        f"({', '.join(BUILTIN_DATASETS)})."
    )
    format: DataFormat = Field(
        default="auto",
        description="File format; auto infers it from the extension. requestLog: uri is a "
        "ModelDeployment's request log (its labelled rows; target names the label column).",
    )
    since: Timestamp | None = Field(default=None, description=SINCE_DESCRIPTION)
    target: ColumnName = Field(description="Column to predict.")
    task: Literal["classification", "regression"] = Field(
        default="classification", description="Classification or regression."
    )
    features: list[ColumnName] = Field(
        default_factory=list,
        max_length=1024,
        description="Columns to use; empty means all but target.",
    )
    extra: list[ExtraData] = Field(
        default_factory=list,
        max_length=4,
        description="More sources whose rows are appended to uri's before the split (e.g. the "
        "served labelled rows of a request log after the original data). Each must have the "
        "selected feature columns and the target (a request log's label becomes target); "
        "other columns are dropped. They share credentialsSecret.",
    )
    split: Split = Field(default_factory=Split, description="Train/validation/test split.")
    group_column: ColumnName | None = Field(
        default=None,
        description="Query/group id column for ranking (e.g. query_id): rows with the same id "
        "are ranked against each other by the model's score, giving the test metrics map_at_k "
        "and ndcg_at_k (k: evaluation.ranking.k). The column is never a model input, and the "
        "split keeps each group's rows together (so no query is seen in training and scored "
        "in test). The target is the relevance: a binary label (its last class is the relevant "
        "one) or numeric grades >= 0 (classification or regression).",
    )
    credentials_secret: SecretName | None = Field(
        default=None,
        description="Name of a Secret in this run's namespace holding the object-store "
        "credentials for s3:// or gs:// data (uri and extra). The kfp executor mounts it into "
        "the pipeline's pods; it is never read from another namespace.",
    )

    @model_validator(mode="after")
    def _group_column_is_an_id(self) -> Self:
        if self.group_column is not None and self.group_column == self.target:
            raise ValueError(
                f"groupColumn={self.group_column!r} is the target; name the query/group id "
                "column, not the column to predict"
            )
        if self.group_column is not None and self.group_column in self.features:
            raise ValueError(
                f"groupColumn={self.group_column!r} is listed in features; the group id is "
                "never fed to the model: leave it out of features"
            )
        return self


class MissingValues(ApiModel):
    """Handling of missing values."""

    strategy: Literal["drop", "mean", "median", "most_frequent", "model"] = Field(
        default="median", description="drop rows, impute a statistic, or impute with a model."
    )


class Outliers(ApiModel):
    """Outlier detection and treatment."""

    method: Literal["none", "iqr", "zscore"] = Field(default="none", description="Detector.")
    action: Literal["clip", "drop"] = Field(default="clip", description="Clip or drop.")
    threshold: float = Field(
        default=3.0, gt=0, le=10, description="IQR multiplier or z-score limit."
    )


class Augmentation(ApiModel):
    """Training-time augmentation per modality."""

    rotation_degrees: float = Field(default=0, ge=0, le=180, description="Images: max rotation.")
    flip: bool = Field(default=False, description="Images: random horizontal flip.")
    scale: float = Field(default=0, ge=0, le=0.5, description="Images: max zoom in/out.")
    image_noise: float = Field(default=0, ge=0, le=1, description="Images: Gaussian noise std.")
    synonym_swap: float = Field(
        default=0, ge=0, le=1, description="Text: probability of swapping a word for a synonym."
    )
    tabular_noise: float = Field(
        default=0, ge=0, le=1, description="Tabular: Gaussian noise std (in scaled units)."
    )


class QualityGate(ApiModel):
    """Stops the run before training when the data is too poor."""

    max_missing_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Largest fraction of missing cells allowed."
    )
    max_duplicate_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Largest duplicate-row fraction allowed."
    )
    min_rows: int = Field(default=50, ge=1, le=10**9, description="Fewest rows after cleaning.")


class Preprocessing(ApiModel):
    """Cleaning and transforms; fitted transforms ship with the model."""

    missing: MissingValues = Field(default_factory=MissingValues, description="Missing values.")
    outliers: Outliers = Field(default_factory=Outliers, description="Outliers.")
    drop_duplicates: bool = Field(default=True, description="Remove duplicate rows.")
    encoding: Literal["onehot", "ordinal"] = Field(
        default="onehot", description="Categorical encoding."
    )
    scaling: Literal["none", "standard", "minmax"] = Field(
        default="standard", description="Numeric scaling."
    )
    augmentation: Augmentation = Field(default_factory=Augmentation, description="Augmentation.")
    quality_gate: QualityGate | None = Field(
        default=None, description="Optional data-quality gate."
    )


class EarlyStopping(ApiModel):
    """Stop when the validation loss stops improving."""

    patience: int = Field(default=5, ge=1, le=1000, description="Epochs without improvement.")
    min_delta: float = Field(
        default=0.0, ge=0, le=1e6, description="Smallest improvement that counts."
    )


class TreeSpec(ApiModel):
    """Gradient-boosted trees (model.family: lightgbm); every field is tunable as
    ``model.trees.<name>``. model.earlyStopping.patience counts boosting rounds here."""

    num_leaves: int = Field(
        default=31, ge=2, le=131072, description="Most leaves per tree (the main capacity knob)."
    )
    max_depth: int = Field(
        default=-1, ge=-1, le=64, description="Deepest a tree may grow; -1 means no limit."
    )
    n_estimators: int = Field(
        default=300,
        ge=1,
        le=10000,
        description="Most boosting rounds; early stopping on the validation split may stop sooner.",
    )
    learning_rate: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Shrinkage of each round (model.learningRate is the networks' optimiser "
        "step; its 1e-3 default would leave trees far from converged).",
    )
    min_child_samples: int = Field(
        default=20, ge=1, le=1000000, description="Fewest training rows in a leaf."
    )
    subsample: float = Field(
        default=1.0, gt=0, le=1, description="Share of rows sampled for each round (bagging)."
    )
    colsample_bytree: float = Field(
        default=1.0, gt=0, le=1, description="Share of features sampled for each tree."
    )
    reg_lambda: float = Field(default=0.0, ge=0, le=1000, description="L2 penalty on leaf values.")


class ModelSpec(ApiModel):
    """Model family and training hyperparameters (tuning may override any of them)."""

    family: Literal["mlp", "cnn", "resnet", "transformer", "rnn", "lstm", "gru", "lightgbm"] = (
        Field(
            default="mlp",
            description="mlp (tabular), cnn/resnet (images), transformer or rnn/lstm/gru "
            "(text, sequences), lightgbm (gradient-boosted trees, tabular).",
        )
    )
    hidden_layers: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [64, 32],
        max_length=16,
        description="Width of each hidden layer (mlp).",
    )
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [16, 32],
        max_length=8,
        description="Channels per conv stage (cnn/resnet).",
    )
    embedding_dim: int = Field(
        default=64, ge=8, le=4096, description="Token embedding width (transformer, rnn/lstm/gru)."
    )
    heads: int = Field(default=4, ge=1, le=64, description="Transformer attention heads.")
    layers: int = Field(
        default=2, ge=1, le=48, description="Transformer encoder layers; rnn/lstm/gru: stacked "
        "recurrent layers.",
    )  # fmt: skip
    hidden_size: int = Field(
        default=64, ge=1, le=4096,
        description="rnn/lstm/gru: recurrent state width per direction.",
    )  # fmt: skip
    bidirectional: bool = Field(
        default=False,
        description="rnn/lstm/gru: also read each text backwards (from its last word); the head "
        "sees both directions' final states, so twice hiddenSize features.",
    )
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout probability.")
    batch_norm: bool = Field(default=True, description="Use BatchNorm.")
    epochs: int = Field(default=30, ge=1, le=10000, description="Maximum epochs.")
    batch_size: int = Field(default=64, ge=1, le=65536, description="Mini-batch size.")
    learning_rate: float = Field(default=1e-3, gt=0, le=10, description="Initial learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="L2 penalty.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(default="adamw", description="Optimiser.")
    lr_schedule: Literal["none", "cosine", "step", "plateau"] = Field(
        default="cosine", description="Learning-rate schedule."
    )
    early_stopping: EarlyStopping | None = Field(
        default_factory=EarlyStopping, description="Early stopping; null disables."
    )
    mixed_precision: bool = Field(default=True, description="bf16 autocast on a GPU.")
    trees: TreeSpec | None = Field(
        default=None,
        description="Gradient-boosted tree settings (family lightgbm); null uses their defaults.",
    )


class Imbalance(ApiModel):
    """Class-imbalance handling (classification only)."""

    strategy: Literal[
        "none", "class_weights", "oversample", "undersample", "smote", "focal_loss"
    ] = Field(default="none", description="Technique.")
    focal_gamma: float = Field(default=2.0, ge=0, le=10, description="Focal-loss gamma.")
    target_ratio: float = Field(
        default=1.0, gt=0, le=1, description="Minority:majority ratio after resampling."
    )


class SearchParameter(ApiModel):
    """One dimension of the search space."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.type == 'categorical' ? has(self.values) && size(self.values) > 0 : "
                "has(self.min) && has(self.max) && self.min < self.max",
                "a categorical parameter needs values; a numeric one needs min < max",
            ),
            cel(
                "!(has(self.log) && self.log) || (has(self.min) && self.min > 0)",
                "log scale needs min > 0",
                field_path=".min",
            ),
        )
    }

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z][a-zA-Z0-9_.]*$")
    ] = Field(description="Hyperparameter, e.g. learningRate or model.dropout.")
    type: Literal["int", "float", "categorical"] = Field(description="Kind of values.")
    min: float | None = Field(default=None, description="Lower bound (numeric).")
    max: float | None = Field(default=None, description="Upper bound (numeric).")
    step: float | None = Field(default=None, gt=0, description="Grid step (numeric).")
    log: bool = Field(default=False, description="Sample on a log scale.")
    values: list[Annotated[str, StringConstraints(max_length=63)]] | None = Field(
        default=None, max_length=64, description="Choices (categorical)."
    )


class Objective(ApiModel):
    """What tuning optimises, on the validation split."""

    metric: GateMetric = Field(default="f1", description="Metric to optimise.")
    direction: Literal["maximize", "minimize"] = Field(
        default="maximize", description="Maximise or minimise."
    )


CMAES_NEEDS_NUMERIC = (
    "algorithm cmaes (CMA-ES) searches int and float parameters: it needs at least one in "
    "searchSpace; with categorical parameters only, use grid, random, bayesian or gp"
)


class Tuning(ApiModel):
    """Hyperparameter search."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.maxTrials >= self.parallelTrials",
                "maxTrials must be >= parallelTrials",
                field_path=".parallelTrials",
            ),
            cel(
                "self.algorithm != 'grid' || self.searchSpace.all(p, p.type == 'categorical' || "
                "has(p.step))",
                "grid search needs a step on every numeric parameter",
                field_path=".searchSpace",
            ),
            cel(
                "self.algorithm != 'cmaes' || self.searchSpace.exists(p, p.type != 'categorical')",
                CMAES_NEEDS_NUMERIC,
                field_path=".searchSpace",
            ),
        )
    }

    algorithm: Literal["grid", "random", "bayesian", "hyperband", "asha", "cmaes", "gp"] = Field(
        default="bayesian",
        description="grid, random, bayesian (TPE), hyperband or asha (TPE with pruning), cmaes "
        "(CMA-ES over the int/float parameters, at least one; categorical ones are drawn by "
        "TPE independently) or gp (Gaussian-process Bayesian optimisation).",
    )
    objective: Objective = Field(default_factory=Objective, description="Objective.")
    max_trials: int = Field(default=20, ge=1, le=1000, description="Trial budget.")
    parallel_trials: int = Field(default=1, ge=1, le=64, description="Trials run at once.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Sampler seed.")
    search_space: list[SearchParameter] = Field(
        min_length=1, max_length=32, description="Dimensions to search (at least one)."
    )

    @model_validator(mode="after")
    def _cmaes_needs_a_numeric_parameter(self) -> Self:
        if self.algorithm == "cmaes" and all(p.type == "categorical" for p in self.search_space):
            names = ", ".join(p.name for p in self.search_space)
            raise ValueError(f"searchSpace ({names}): {CMAES_NEEDS_NUMERIC}")
        return self


def _metric_list(names: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"


class Gate(ApiModel):
    """A test-split metric threshold the model must meet to be registered."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                f"!(self.metric in {_metric_list(FRACTION_METRICS)}) || "
                "(self.value >= 0.0 && self.value <= 1.0)",
                f"the value of a gate on {', '.join(FRACTION_METRICS)} is a fraction in 0..1",
                field_path=".value",
                message_expression="self.metric + ' is a fraction: a gate on it needs a value "
                "in 0..1'",
            ),
            cel(
                f"!(self.metric in {_metric_list(NON_NEGATIVE_METRICS)}) || self.value >= 0.0",
                f"the value of a gate on {', '.join(NON_NEGATIVE_METRICS)} must be >= 0",
                field_path=".value",
                message_expression="self.metric + ' is never negative: a gate on it needs a "
                "value >= 0'",
            ),
            cel(
                "self.metric != 'r2' || self.value <= 1.0",
                "r2 is at most 1: a gate on it needs a value <= 1",
                field_path=".value",
            ),
        )
    }

    metric: GateMetric = Field(description="Metric name.")
    op: Literal[">=", ">", "<=", "<"] = Field(default=">=", description="Comparison.")
    value: float = Field(
        ge=-1e9,
        le=1e9,
        description=f"Threshold: 0..1 for {', '.join(FRACTION_METRICS)}; >= 0 for "
        f"{', '.join(NON_NEGATIVE_METRICS)}; <= 1 for r2.",
    )

    @model_validator(mode="after")
    def _value_in_range(self) -> Self:
        v, metric = self.value, self.metric
        why = ""
        if metric in FRACTION_METRICS and not 0 <= v <= 1:
            why = "is a fraction: a gate on it needs a value in 0..1"
        elif metric in NON_NEGATIVE_METRICS and v < 0:
            why = "is never negative: a gate on it needs a value >= 0"
        elif metric == "r2" and v > 1:
            why = "is at most 1: a gate on it needs a value <= 1"
        if why:
            raise ValueError(f"{metric} {why}, not {v}")
        return self


class Ranking(ApiModel):
    """How the test rows are ranked within each data.groupColumn group."""

    k: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Cut-off of map_at_k and ndcg_at_k: only each group's k highest-scored rows "
        "count (a group with fewer rows counts all of them).",
    )


FitVerdict = Literal["overfit", "underfit"]


def _reject_overfit() -> list[FitVerdict]:
    return ["overfit"]


class FitGate(ApiModel):
    """Refuse to register a model whose learning curves show the listed verdicts.

    A separate gate rather than a ``gates`` entry: a Gate compares a number with a threshold
    (``op``/``value``, bounded per metric, and its metric names double as tuning objectives),
    whereas the fit verdict is a category with its explanation. Its result still joins the
    gate results (``fit=overfit ✗: …``), so it fails a run exactly as a metric gate does.
    """

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel("self.reject.all(v, self.reject.exists_one(w, w == v))", "reject must not repeat")
        )
    }

    reject: list[FitVerdict] = Field(
        default_factory=_reject_overfit,
        min_length=1,
        max_length=2,
        description="Learning-curve verdicts that block registration: overfit (validation "
        "loss rising while training loss falls, or a large generalisation gap), underfit (flat "
        "or still-falling losses, or a loss near guessing). A run without recorded curves "
        "fails this gate.",
    )

    @model_validator(mode="after")
    def _no_repeats(self) -> Self:
        if len(set(self.reject)) != len(self.reject):
            raise ValueError(f"reject={self.reject} repeats a verdict; list each once")
        return self


class Evaluation(ApiModel):
    """Evaluation and registration gates."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.fitGate) || self.learningCurves",
                "fitGate judges the learning curves: it needs learningCurves: true",
                field_path=".fitGate",
            )
        )
    }

    gates: list[Gate] = Field(
        default_factory=list, max_length=16, description="All must pass or nothing is registered."
    )
    learning_curves: bool = Field(
        default=True, description="Record train/validation loss per epoch."
    )
    fit_gate: FitGate | None = Field(
        default=None,
        description="Also refuse registration on an over- or under-fitted model, judged from "
        "the learning curves (e.g. reject: [overfit]); the verdict's explanation is in the "
        "gate message.",
    )
    ranking: Ranking | None = Field(
        default=None,
        description=f"Ranking metrics ({', '.join(RANKING_METRICS)}) settings; needs "
        "data.groupColumn. With a groupColumn and no ranking section, k is 10.",
    )

    @model_validator(mode="after")
    def _fit_gate_needs_curves(self) -> Self:
        if self.fit_gate is not None and not self.learning_curves:
            raise ValueError(
                "fitGate judges the learning curves: it needs learningCurves: true, not false"
            )
        return self


class Explanation(ApiModel):
    """Global and per-sample explanations, saved as plots, and the explanation report."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.method != 'none' || !(self.lime || self.partialDependence || "
                "self.counterfactuals)",
                "lime, partialDependence and counterfactuals run in the explain step, which "
                "method: none turns off: choose a method (e.g. permutation)",
                field_path=".method",
            ),
        )
    }

    method: Literal["none", "shap", "permutation", "integrated_gradients", "gradcam"] = Field(
        default="permutation", description="Explanation technique."
    )
    samples: int = Field(default=100, ge=1, le=100000, description="Rows (or images) explained.")
    lime: bool = Field(
        default=False,
        description="LIME (tables and text): for localRows held-out test rows, a weighted "
        "linear model fitted on perturbations around the row, through the serving model.",
    )
    partial_dependence: bool = Field(
        default=False,
        description="Partial dependence and ICE curves of the most important features "
        "(tables), swept over the serving model across each feature's training range.",
    )
    counterfactuals: bool = Field(
        default=False,
        description="For localRows held-out test rows, a small change of the top features "
        "(within their training range, L1 cost in standard deviations) that flips the "
        "predicted class; classification on tables only.",
    )
    local_rows: int = Field(
        default=5, ge=1, le=20, description="Held-out test rows given LIME and counterfactuals."
    )

    @model_validator(mode="after")
    def _extras_need_the_step(self) -> Self:
        asked = {
            "lime": self.lime,
            "partialDependence": self.partial_dependence,
            "counterfactuals": self.counterfactuals,
        }
        extras = [name for name, on in asked.items() if on]
        if self.method == "none" and extras:
            raise ValueError(
                f"{', '.join(extras)} run in the explain step, which method: none turns off: "
                "choose a method (e.g. permutation)"
            )
        return self


class Optimization(ApiModel):
    """Post-training optimisation; each variant is kept only within budget."""

    pruning: float = Field(
        default=0, ge=0, lt=1, description="Magnitude-pruning sparsity (0 disables)."
    )
    quantize_int8: bool = Field(default=False, description="int8 dynamic quantisation (torchao).")
    distill_hidden_layers: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=list,
        max_length=8,
        description="Student architecture for distillation (empty disables).",
    )
    max_accuracy_drop: float = Field(
        default=0.005, ge=0, le=1, description="Largest objective drop allowed (absolute)."
    )
    min_speedup: float = Field(
        default=1.5, ge=1, le=100, description="Smallest latency speed-up that justifies a variant."
    )


class Registration(ApiModel):
    """Where the resulting model is registered."""

    model_name: DNSLabel = Field(description="Registered model name for the ModelVersion.")
    alias: Alias | None = Field(default="candidate", description="Alias the new version claims.")
    labels: LabelMap = Field(default_factory=dict, description="Labels for the ModelVersion.")
    parent_version: DNSLabel | None = Field(
        default=None,
        description="ModelVersion this run retrains (e.g. the one a DriftPolicy saw drift "
        "in); recorded as the registered version's lineage.parentVersion.",
    )


# Ranking metrics rank rows within groups: without data.groupColumn there is nothing to rank.
RANKING_NEEDS_GROUPS: Final = (
    cel(
        "has(self.data.groupColumn) || !has(self.evaluation) || !has(self.evaluation.gates) || "
        f"!self.evaluation.gates.exists(g, g.metric in {_metric_list(RANKING_METRICS)})",
        f"a gate on {' or '.join(RANKING_METRICS)} needs data.groupColumn (the query/group id "
        "the rows are ranked within)",
        field_path=".evaluation.gates",
    ),
    cel(
        "has(self.data.groupColumn) || !has(self.evaluation) || !has(self.evaluation.ranking)",
        "evaluation.ranking needs data.groupColumn (the query/group id the rows are ranked within)",
        field_path=".evaluation.ranking",
    ),
)


def ranking_spec_problem(data: DataSource, evaluation: Evaluation) -> str:
    """Why ranking settings cannot apply ('' if they can): the model's copy of
    :data:`RANKING_NEEDS_GROUPS`."""
    if data.group_column is not None:
        return ""
    for i, gate in enumerate(evaluation.gates):
        if gate.metric in RANKING_METRICS:
            return (
                f"evaluation.gates[{i}].metric={gate.metric} ranks rows within groups: it needs "
                "data.groupColumn (the query/group id the rows are ranked within)"
            )
    if evaluation.ranking is not None:
        return (
            "evaluation.ranking needs data.groupColumn (the query/group id the rows are ranked "
            "within)"
        )
    return ""


class TrainingRunSpec(ApiModel):
    """A training run: compiled into a Kubeflow pipeline and executed."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.data.task == 'classification' || self.imbalance.strategy == 'none'",
                "imbalance handling applies to classification only",
                field_path=".imbalance",
            ),
            cel(
                "self.model.family != 'transformer' || self.model.embeddingDim % self.model.heads "
                "== 0",
                "embeddingDim must be divisible by heads",
                field_path=".model.heads",
            ),
            cel(
                "self.data.task == 'classification' || !self.explanation.counterfactuals",
                "explanation.counterfactuals flip a predicted class: they need data.task: "
                "classification",
                field_path=".explanation.counterfactuals",
            ),
            *RANKING_NEEDS_GROUPS,
        )
    }

    data: DataSource = Field(description="Training data.")
    preprocessing: Preprocessing = Field(default_factory=Preprocessing, description="Cleaning.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model and training.")
    imbalance: Imbalance = Field(default_factory=Imbalance, description="Imbalance handling.")
    tuning: Tuning | None = Field(default=None, description="Hyperparameter search.")
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Gates.")
    explanation: Explanation = Field(default_factory=Explanation, description="Explanations.")
    optimization: Optimization = Field(default_factory=Optimization, description="Optimisation.")
    resources: ComputeResources = Field(
        default_factory=ComputeResources, description="Resources of the training step."
    )
    executor: Literal["default", "local", "kfp"] = Field(
        default="default",
        description="local (embedded KFP runner) or kfp; default follows the operator's setting.",
    )
    registration: Registration = Field(description="Model registration.")
    schedule: CronSchedule | None = Field(
        default=None, description=f"Cron schedule for continuous training: {CRON_HELP}."
    )
    caching: bool = Field(default=True, description="Reuse outputs of unchanged steps.")
    retries: int = Field(default=2, ge=0, le=10, description="Retries per failing step.")
    timeout: PositiveDuration = Field(
        default="2h", description="Deadline of the whole run (at least 1s, e.g. 90s, 30m, 1h30m)."
    )
    suspend: bool = Field(
        default=False,
        description="Hold the run until approved: while true, no attempt is submitted (phase "
        f"Suspended) unless the annotation {APPROVE_ANNOTATION}=true is set. Setting it on a "
        "run already submitted does not stop that run; changing only suspend never starts a "
        "new attempt.",
    )

    @model_validator(mode="after")
    def _ranking_needs_groups(self) -> Self:
        problem = ranking_spec_problem(self.data, self.evaluation)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _counterfactuals_need_classes(self) -> Self:
        if self.explanation.counterfactuals and self.data.task != "classification":
            raise ValueError(
                "explanation.counterfactuals flip a predicted class: they need data.task: "
                f"classification, not {self.data.task}"
            )
        return self


class Trials(ApiModel):
    """Tuning progress."""

    completed: int = Field(default=0, ge=0, description="Finished trials.")
    total: int = Field(default=0, ge=0, description="Trial budget.")
    pruned: int = Field(default=0, ge=0, description="Trials stopped early.")
    progress: ShortText = Field(default="", description="e.g. 7/20 (for kubectl get).")
    best_params: Annotated[dict[str, ShortText], Field(max_length=32)] = Field(
        default_factory=dict, description="Best hyperparameters so far."
    )
    best_value: float | None = Field(default=None, description="Best objective so far.")


class Attempt(ApiModel):
    """One earlier execution of the run (spec changes start a new attempt)."""

    number: int = Field(ge=1, description="Attempt number.")
    generation: int = Field(ge=0, description="Spec generation it ran.")
    run_id: ShortText = Field(default="", description="Executor run id.")
    result: ShortText = Field(default="", description="Succeeded, Failed or Superseded.")
    finished_at: ShortText = Field(default="", description="When it ended.")


class DataSnapshot(ApiModel):
    """The data the current attempt trained on, as its ingest step read it."""

    uri: Annotated[str, StringConstraints(max_length=1024)] = Field(
        default="", description="data.uri it read (data.extra sources are counted in sources)."
    )
    fingerprint: Annotated[str, StringConstraints(max_length=128)] = Field(
        default="",
        description="Content hash of every data source (sha256:…): equal fingerprints, equal "
        "data; with spec.caching, ingest and preprocess are reused while it stays the same.",
    )
    rows: int = Field(default=0, ge=0, description="Labelled rows read, every source together.")
    sources: int = Field(default=0, ge=0, description="Data sources read (data.uri + extra).")
    cached: bool = Field(
        default=False, description="Ingest reused an earlier attempt's output (spec.caching)."
    )


class TrainingRunStatus(StatusBase):
    """Progress and results of the run."""

    phase: Literal["", "Pending", "Suspended", "Queued", "Running", "Succeeded", "Failed"] = Field(
        default="", description="Summary of the run."
    )
    attempt: int = Field(default=0, ge=0, description="Current attempt number.")
    spec_hash: Annotated[str, StringConstraints(max_length=64)] = Field(
        default="", description="Hash of the compiled pipeline."
    )
    run_id: ShortText = Field(default="", description="Executor run id.")
    current_step: ShortText = Field(default="", description="Step running now.")
    trials: Trials = Field(default_factory=Trials, description="Tuning progress.")
    metrics: Annotated[dict[MetricName, float], Field(max_length=64)] = Field(
        default_factory=dict, description="Test-split metrics of the final model."
    )
    best_metric: ShortText = Field(default="", description="e.g. f1=0.97 (for kubectl get).")
    artifacts: Annotated[
        dict[ShortText, Annotated[str, StringConstraints(max_length=1024)]], Field(max_length=32)
    ] = Field(default_factory=dict, description="Artifact URIs: model, metrics, plots, report.")
    model_version: DNSLabel | None = Field(default=None, description="ModelVersion registered.")
    history: list[Attempt] = Field(
        default_factory=list, max_length=20, description="Earlier attempts, newest last."
    )
    started_at: ShortText = Field(default="", description="Start of the current attempt.")
    completed_at: ShortText = Field(default="", description="End of the current attempt.")
    last_scheduled_at: ShortText = Field(default="", description="Last cron-triggered start.")
    data: DataSnapshot | None = Field(
        default=None, description="The data snapshot the current attempt trained on."
    )


class TrainingRun(Resource):
    crd = CRDInfo(
        kind="TrainingRun",
        plural="trainingruns",
        short_names=("tr",),
        description="Trains, tunes, evaluates, explains, optimises and registers a model.",
        columns=(
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Step", ".status.currentStep"),
            PrinterColumn("Trials", ".status.trials.progress"),
            PrinterColumn("Best", ".status.bestMetric"),
            PrinterColumn("Model", ".status.modelVersion"),
            PrinterColumn("Executor", ".spec.executor", priority=1),
            PrinterColumn("Data", ".status.data.fingerprint", priority=1),
            *ready_columns(),
        ),
    )
    spec: TrainingRunSpec
    status: TrainingRunStatus = Field(default_factory=TrainingRunStatus)
