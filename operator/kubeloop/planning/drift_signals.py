"""A DriftPolicy's signals, evaluated over one window: pure, from what the handler read.

Per-feature and prediction signals compare the served window's bucket counts with the stable
version's reference (``planning/drift.py``); concept signals hold the window's labelled
accuracy, F1, MAE or RMSE (the serving runtime's feedback counters) to a threshold; promql
signals hold the tenant's scoped query to one. Every signal has a minimum count: below it the
value is recorded and the outcome is ``Inconclusive``, never a breach nor a pass.

``threshold: auto``:
- drift statistics: :func:`drift.auto_threshold` at the window's n (for ``feature: "*"`` each
  feature at the Šidák rate, so the rule as a whole keeps ``falseAlarmRate``);
- accuracy: the ModelVersion's evaluated accuracy less z * sqrt(a (1 - a) / n), the one-sided
  binomial bound at the window's n labelled rows (z for ``falseAlarmRate``). The test split's
  own sampling error is not added: a model evaluated on few rows breaches sooner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Final

from kubeloop import reasons
from kubeloop.api.drift_policy import (
    CONCEPT_SIGNALS,
    FEATURE_SIGNALS,
    FeatureScore,
    Outcome,
    Signal,
)
from kubeloop.api.model_version import HistogramReference, ModelVersion
from kubeloop.contract.serving_metrics import bucket_labels
from kubeloop.planning import drift

DEFAULT_MIN_LABELLED: Final = 50
TOP_FEATURES: Final = 5


@dataclass(frozen=True)
class Baseline:
    """The served stable version's references, in the form the statistics need."""

    version: str
    features: Mapping[str, drift.Reference]
    prediction: drift.Reference | None
    metrics: Mapping[str, float]
    task: str

    @classmethod
    def of(cls, mv: ModelVersion) -> Baseline:
        return cls(
            version=mv.name,
            features={r.name: _reference(r) for r in mv.spec.reference if r.fractions},
            prediction=(
                _reference(mv.spec.prediction_reference)
                if mv.spec.prediction_reference and mv.spec.prediction_reference.fractions
                else None
            ),
            metrics=dict(mv.spec.metrics),
            task=mv.spec.task,
        )


def _reference(h: HistogramReference) -> drift.Reference:
    return drift.Reference.of(h.fractions, h.edges, rows=h.rows)


@dataclass(frozen=True)
class Window:
    """What the handler read from Prometheus for one evaluation (None: could not be read).

    ``features``: per feature, the served count per reference bucket (value buckets in edge
    order, then the missing bucket); ``predictions`` likewise; ``concept``: per concept signal
    type, (value, labelled rows); ``custom``: per promql signal name, its value."""

    features: Mapping[str, Sequence[float]] | None = None
    predictions: Sequence[float] | None = None
    concept: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    custom: Mapping[str, float | None] = field(default_factory=dict)
    problem: str = ""  # why nothing could be read (e.g. Prometheus unreachable)


@dataclass(frozen=True)
class Result:
    """One signal's evaluation."""

    name: str
    type: str
    value: float | None
    threshold: float | None
    count: float | None
    outcome: Outcome
    feature: str = ""
    message: str = ""
    scores: tuple[FeatureScore, ...] = ()  # per feature, for the top drifted features
    below: bool = False  # breaches when the value falls below the threshold

    @property
    def margin(self) -> float:
        """How far over its threshold (value / threshold, inverted for below-signals)."""
        if self.value is None or self.threshold is None:
            return 0.0
        if self.below:
            return self.threshold / self.value if self.value > 0 else math.inf
        return self.value / self.threshold if self.threshold > 0 else math.inf

    def score_text(self) -> str:
        if self.value is None:
            return f"{self.name}=n/a"
        where = f"[{self.feature}]" if self.feature else ""
        return f"{self.type}{where}={self.value:.3g}"


def min_count(signal: Signal) -> float:
    if signal.min_count is not None:
        return float(signal.min_count)
    return float(
        DEFAULT_MIN_LABELLED if signal.type in CONCEPT_SIGNALS else drift.DEFAULT_MIN_COUNT
    )


def problems(signals: Sequence[Signal], baseline: Baseline) -> list[tuple[str, str]]:
    """What in the spec cannot be evaluated against this baseline: (reason, message naming the
    field) each; ``NoReference`` where the version lacks the reference a signal needs."""
    out: list[tuple[str, str]] = []
    v = baseline.version
    for i, s in enumerate(signals):
        at = f"spec.signals[{i}]"
        if s.type in FEATURE_SIGNALS:
            if not baseline.features:
                why = f"{at}.type={s.type}: ModelVersion {v} has no feature reference"
                out.append((reasons.NO_REFERENCE, f"{why} (spec.reference) to compare with"))
            elif s.feature != "*" and s.feature not in baseline.features:
                known = ", ".join(sorted(baseline.features)[:12])
                why = f"{at}.feature={s.feature!r} is not a feature of ModelVersion {v}"
                out.append((reasons.INVALID_SPEC, f"{why} (features: {known})"))
            elif s.type == "wasserstein" and any(
                len(r.gaps) != r.placed - 1 for r in _chosen(s, baseline).values()
            ):
                why = f"{at}.type=wasserstein needs reference edges on every feature"
                out.append((reasons.NO_REFERENCE, why))
        elif s.type == "prediction" and baseline.prediction is None:
            why = f"{at}.type=prediction: ModelVersion {v} has no predictionReference"
            out.append((reasons.NO_REFERENCE, f"{why} to compare with"))
        elif s.type in ("accuracy", "f1") and baseline.task != "classification":
            out.append((reasons.INVALID_SPEC, f"{at}.type={s.type} needs a classifier; {v} is not"))
        elif s.type in ("mae", "rmse") and baseline.task != "regression":
            out.append((reasons.INVALID_SPEC, f"{at}.type={s.type} needs a regressor; {v} is not"))
        if s.threshold == "auto" and s.type == "accuracy" and "accuracy" not in baseline.metrics:
            why = f"{at}.threshold=auto: ModelVersion {v} has no evaluated accuracy"
            out.append((reasons.INVALID_SPEC, f"{why} (spec.metrics) to calibrate from"))
    return out


def _chosen(signal: Signal, baseline: Baseline) -> dict[str, drift.Reference]:
    if signal.feature == "*":
        return dict(baseline.features)
    return {str(signal.feature): baseline.features[str(signal.feature)]}


def evaluate(signals: Sequence[Signal], baseline: Baseline, window: Window) -> list[Result]:
    """Every signal's result. CPU-bound the first time an auto threshold is calibrated at a new
    sample size (cached afterwards): the handler runs it off the event loop."""
    return [_evaluate(s, baseline, window) for s in signals]


def _evaluate(signal: Signal, baseline: Baseline, window: Window) -> Result:
    name, type_ = signal.name, signal.type
    if window.problem:
        return Result(name, type_, None, None, None, "Inconclusive", message=window.problem[:256])
    if type_ in FEATURE_SIGNALS:
        return _features(signal, baseline, window)
    if type_ == "prediction":
        return _prediction(signal, baseline, window)
    if type_ in CONCEPT_SIGNALS:
        return _concept(signal, baseline, window)
    value = window.custom.get(name)
    threshold = float(signal.threshold) if signal.threshold != "auto" else None
    if value is None or threshold is None:
        return Result(name, type_, value, threshold, None, "Inconclusive", message="no data")
    below = signal.comparison == "below"
    breach = value < threshold if below else value > threshold
    return Result(
        name,
        type_,
        value,
        threshold,
        None,
        "Breach" if breach else "Pass",
        below=below,
    )


def _features(signal: Signal, baseline: Baseline, window: Window) -> Result:
    name, statistic = signal.name, drift_statistic(signal)
    refs = _chosen(signal, baseline)
    served = window.features or {}
    verdicts: dict[str, drift.Verdict] = {}
    for feature, ref in refs.items():
        counts = served.get(feature)
        verdicts[feature] = drift.compare(
            ref,
            list(counts) if counts is not None else [0.0] * len(ref.fractions),
            statistic=statistic,
            min_count=min_count(signal),
        )
    rate = signal.false_alarm_rate
    if signal.feature == "*" and signal.share is None:
        rate = drift.per_feature_false_alarm(rate, len(refs))
    limits = {f: _threshold(signal, refs[f], v, rate) for f, v in verdicts.items()}
    scores = tuple(
        sorted(
            (
                FeatureScore(feature=f, statistic=statistic, value=v.value, threshold=limits[f])
                for f, v in verdicts.items()
                if v.conclusive and v.value is not None
            ),
            key=lambda s: -(s.value / s.threshold),
        )
    )
    count = max((v.n for v in verdicts.values()), default=0.0)
    if signal.share is not None:
        shared = drift.share_drifted(verdicts, limits, share=signal.share)
        return Result(
            name,
            statistic,
            shared.share,
            signal.share,
            count,
            _outcome(shared.outcome),
            message=f"{len(shared.drifted)}/{shared.total} features drifted"
            + (
                f", {shared.total - shared.conclusive} inconclusive"
                if shared.conclusive < shared.total
                else ""
            ),
            scores=scores,
        )
    worst = drift.worst_feature(verdicts, limits)
    if worst.verdict is None:  # nothing conclusive: record the largest value all the same
        valued = [(v.value / limits[f], f) for f, v in verdicts.items() if v.value is not None]
        top = max(valued)[1] if valued else ""
        return Result(
            name,
            statistic,
            verdicts[top].value if top else None,
            limits[top] if top else None,
            count,
            "Inconclusive",
            feature=top,
            message=f"fewer than {min_count(signal):g} rows in the window",
            scores=scores,
        )
    return Result(
        name,
        statistic,
        worst.verdict.value,
        worst.threshold,
        worst.verdict.n,
        _outcome(worst.outcome),
        feature=worst.feature or "",
        message=(
            f"{len(worst.inconclusive)} features below the minimum count"
            if worst.inconclusive
            else ""
        ),
        scores=scores,
    )


def drift_statistic(signal: Signal) -> drift.Statistic:
    if signal.type == "prediction":
        return signal.statistic or "psi"
    return signal.type  # type: ignore[return-value]  # one of FEATURE_SIGNALS here


def _threshold(signal: Signal, ref: drift.Reference, verdict: drift.Verdict, rate: float) -> float:
    if signal.threshold != "auto":
        return max(float(signal.threshold), 1e-12)
    n = verdict.n if verdict.n >= 1 else max(min_count(signal), 1.0)
    return drift.auto_threshold(ref, n, verdict.statistic, false_alarm=rate)


def _prediction(signal: Signal, baseline: Baseline, window: Window) -> Result:
    statistic = drift_statistic(signal)
    ref = baseline.prediction
    if ref is None:
        return Result(
            signal.name, "prediction", None, None, None, "Inconclusive", message="no reference"
        )
    counts = (
        list(window.predictions) if window.predictions is not None else [0.0] * len(ref.fractions)
    )
    verdict = drift.compare(ref, counts, statistic=statistic, min_count=min_count(signal))
    threshold = _threshold(signal, ref, verdict, signal.false_alarm_rate)
    return Result(
        signal.name,
        "prediction",
        verdict.value,
        threshold,
        verdict.n,
        _outcome(verdict.outcome(threshold)),
        message="" if verdict.conclusive else f"fewer than {min_count(signal):g} predictions",
    )


def _concept(signal: Signal, baseline: Baseline, window: Window) -> Result:
    value, labelled = window.concept.get(signal.type, (None, None))
    n = labelled or 0.0
    below = signal.type in ("accuracy", "f1")
    needed = min_count(signal)
    threshold: float | None
    if signal.threshold == "auto":  # accuracy only (the API refuses the others)
        evaluated = baseline.metrics.get("accuracy")
        if evaluated is None or n <= 0:
            threshold = None
        else:
            z = NormalDist().inv_cdf(1 - signal.false_alarm_rate)
            threshold = evaluated - z * math.sqrt(max(evaluated * (1 - evaluated), 1e-6) / n)
    else:
        threshold = float(signal.threshold)
    if value is None or threshold is None or not math.isfinite(value) or n < needed:
        return Result(
            signal.name,
            signal.type,
            value,
            threshold,
            n,
            "Inconclusive",
            message=f"{n:g} labelled rows, fewer than {needed:g}",
            below=below,
        )
    breach = value < threshold if below else value > threshold
    return Result(
        signal.name, signal.type, value, threshold, n, "Breach" if breach else "Pass", below=below
    )


def _outcome(outcome: drift.Outcome) -> Outcome:
    return {"breach": "Breach", "pass": "Pass", "inconclusive": "Inconclusive"}[outcome]  # type: ignore[return-value]


def overall(results: Sequence[Result]) -> Outcome:
    """Breach where any signal breaches; Pass where every one passes; else Inconclusive."""
    if any(r.outcome == "Breach" for r in results):
        return "Breach"
    if results and all(r.outcome == "Pass" for r in results):
        return "Pass"
    return "Inconclusive"


def top_features(results: Sequence[Result], limit: int = TOP_FEATURES) -> list[FeatureScore]:
    """The features furthest over (or nearest to) their thresholds, over every signal."""
    best: dict[str, FeatureScore] = {}
    for r in results:
        for s in r.scores:
            kept = best.get(s.feature)
            if kept is None or s.value / s.threshold > kept.value / kept.threshold:
                best[s.feature] = s
    ranked = sorted(best.values(), key=lambda s: -(s.value / s.threshold))
    return ranked[:limit]


def bucket_counts(served: Mapping[str, float], ref: drift.Reference) -> list[float]:
    """Served counts keyed by ``bucket`` label, as the runtime exports them, in the
    reference's bucket order (value buckets, then the missing bucket where it has one)."""
    labels = bucket_labels(ref.placed)
    return [float(served.get(label, 0.0)) for label in labels[: len(ref.fractions)]]
