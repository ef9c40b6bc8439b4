"""The rollout as a pure function: (spec, status, what the world looks like, now) → decision.

Flagger's and Argo Rollouts' hardest bugs were missing metrics that promoted a canary; here a
check without data is *Inconclusive*, and an inconclusive step is held, never promoted.

With ``rollout.approval: manual`` a canary that passed the step before the last holds there
until the deployment's approve annotation names it (Flagger's confirm-promotion): the phase
stays Progressing, not Paused, because the analysis goes on while it waits (Paused is the
user's ``spec.paused``, which stops the analysis), and the wait does not count against
``maxDuration``, since a person may take a weekend to decide.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from kubeloop import reasons
from kubeloop.api.base import Condition
from kubeloop.api.model_deployment import (
    AnalysisResult,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    RolloutRecord,
    VersionWeight,
)
from kubeloop.contract.durations import parse_rfc3339, rfc3339, seconds
from kubeloop.contract.labels import APPROVE_ANNOTATION
from kubeloop.planning.conditions import set_condition

HISTORY_LIMIT = 20
# A stable MAE of 0 still gives a finite relative increase (the status stores a number).
_MAE_FLOOR = 1e-12


@dataclass(frozen=True)
class LabelledQuality:
    """Labelled outcomes of the canary and the stable over the same window (None: no data):
    accuracy for classification, MAE for regression, and the labelled rows behind each."""

    task: Literal["classification", "regression"]
    canary: float | None = None
    stable: float | None = None
    canary_rows: float | None = None
    stable_rows: float | None = None

    def drop(self) -> float | None:
        """How much worse the canary is than the stable: accuracy points (classification) or
        the relative increase of the MAE (regression); negative when it is better."""
        if self.canary is None or self.stable is None:
            return None
        if math.isnan(self.canary) or math.isnan(self.stable):
            return None
        if self.task == "classification":
            return self.stable - self.canary
        return (self.canary - self.stable) / max(self.stable, _MAE_FLOOR)


@dataclass(frozen=True)
class Measurements:
    """What Prometheus said about the canary (and stable) over the last interval.
    None means no data: empty, NaN or unreachable series."""

    requests: float | None = None
    error_rate: float | None = None
    p99_latency_ms: float | None = None
    prediction_shift: float | None = None
    custom: Mapping[str, float | None] = field(default_factory=dict)
    labelled: LabelledQuality | None = None  # None: not measured (no task, or no Prometheus)


@dataclass(frozen=True)
class Approval:
    """The deployment's approve annotation, as the handler read it (the plan stays pure)."""

    deployment: str = "NAME"  # the ModelDeployment, named by the command in the messages
    namespace: str = ""
    value: str | None = None  # the annotation's value; None: not annotated

    def approves(self, canary: str) -> bool:
        value = (self.value or "").strip()
        return value == canary or value.lower() == "true"

    def command(self, canary: str) -> str:
        namespace = f" -n {self.namespace}" if self.namespace else ""
        return (
            f"kubectl annotate modeldeployment {self.deployment} "
            f"{APPROVE_ANNOTATION}={canary}{namespace} --overwrite"
        )


@dataclass(frozen=True)
class Target:
    """The version the spec asks for, as resolved from the registry."""

    version: str | None  # ModelVersion name; None: cannot be resolved
    problem: str = ""  # why not (unknown version, not Ready, incompatible signature)
    reason: str = ""


@dataclass
class Decision:
    status: ModelDeploymentStatus
    stable: str | None
    canary: str | None
    weight: int
    analyse: bool = False  # the handler should measure, then call again with measurements
    requeue_after: float = 1.0
    events: list[tuple[str, str, str]] = field(default_factory=list)
    promoted: str | None = None  # a version that just became stable (claims the promote alias)
    reset_manual_action: bool = False
    clear_approval: bool = False  # the approve annotation was used: remove it


def analysis_due(
    spec: ModelDeploymentSpec,
    status: ModelDeploymentStatus,
    target: str | None,
    *,
    canary_ready: bool,
    now: dt.datetime,
) -> bool:
    """Whether this pass judges the canary's step, so the handler measures before it plans
    (the same conditions under which :func:`plan_rollout` concludes a step)."""
    canary = status.canary.model_version
    if canary is None or canary != target or status.stable.model_version in (None, target):
        return False
    if spec.paused or spec.manual_action != "none" or not canary_ready:
        return False
    started = parse_rfc3339(status.step_started_at) or now
    return (now - started).total_seconds() >= seconds(spec.rollout.interval)


def psi(expected: Mapping[str, float], actual: Mapping[str, float]) -> float | None:
    """Population stability index between two bucket-count histograms (None: no data)."""
    keys = set(expected) | set(actual)
    total_e, total_a = sum(expected.values()), sum(actual.values())
    if not keys or total_e <= 0 or total_a <= 0:
        return None
    eps = 1e-4
    value = 0.0
    for key in keys:
        e = max(expected.get(key, 0.0) / total_e, eps)
        a = max(actual.get(key, 0.0) / total_a, eps)
        value += (a - e) * math.log(a / e)
    return value


def judge(
    spec: ModelDeploymentSpec, m: Measurements, step: int, now: dt.datetime
) -> list[AnalysisResult]:
    """Verdict of every check for one step. Too few requests makes every check inconclusive."""
    a = spec.rollout.analysis
    stamp = rfc3339(now)

    def result(check: str, value: float | None, ok: bool | None) -> AnalysisResult:
        verdict = "Inconclusive" if ok is None else "Pass" if ok else "Fail"
        return AnalysisResult(step=step, check=check, value=value, verdict=verdict, time=stamp)

    enough = m.requests is not None and m.requests >= a.min_requests
    results = [result("requests", m.requests, True if enough else None)]

    def bounded(check: str, value: float | None, low: float | None, high: float | None) -> None:
        if not enough or value is None or math.isnan(value):
            results.append(result(check, value, None))
            return
        ok = (low is None or value >= low) and (high is None or value <= high)
        results.append(result(check, value, ok))

    bounded("errorRate", m.error_rate, None, a.max_error_rate)
    bounded("p99LatencyMs", m.p99_latency_ms, None, a.max_p99_latency_ms)
    if a.max_prediction_shift is not None:
        bounded("predictionShift", m.prediction_shift, None, a.max_prediction_shift)
    for metric in a.metrics:
        bounded(metric.name, m.custom.get(metric.name), metric.min, metric.max)
    if a.max_accuracy_drop is not None:
        q = m.labelled
        rows = None
        if q is not None and q.canary_rows is not None and q.stable_rows is not None:
            rows = min(q.canary_rows, q.stable_rows)  # the side with fewer labels decides
        labelled = rows is not None and rows >= a.min_labelled_rows
        results.append(result("labelledRows", rows, True if labelled else None))
        drop = q.drop() if q is not None and labelled else None
        bounded("labelledAccuracyDrop", drop, None, a.max_accuracy_drop)
    return results


def plan_rollout(
    spec: ModelDeploymentSpec,
    status: ModelDeploymentStatus,
    target: Target,
    *,
    generation: int,
    stable_ready: bool,
    canary_ready: bool,
    measurements: Measurements | None,
    now: dt.datetime,
    approval: Approval | None = None,
) -> Decision:
    """One step of the rollout state machine."""
    rollout = _Rollout(
        spec,
        status,
        target,
        generation=generation,
        stable_ready=stable_ready,
        now=now,
        approval=approval or Approval(),
    )
    return rollout.decide(canary_ready=canary_ready, measurements=measurements)


class _Rollout:
    """The state of one decision: a copy of the status it edits, the Events it emits."""

    def __init__(
        self,
        spec: ModelDeploymentSpec,
        status: ModelDeploymentStatus,
        target: Target,
        *,
        generation: int,
        stable_ready: bool,
        now: dt.datetime,
        approval: Approval,
    ) -> None:
        self.spec, self.target, self.now, self.approval = spec, target, now, approval
        self.clear_approval = False
        self.generation, self.stable_ready = generation, stable_ready
        self.st = status.model_copy(deep=True)
        self.st.observed_generation = generation
        self.stamp = rfc3339(now)
        self.events: list[tuple[str, str, str]] = []
        self.interval = seconds(spec.rollout.interval)

    def finish(
        self,
        phase: str,
        *,
        weight: int,
        canary: str | None,
        analyse: bool = False,
        requeue: float = 1.0,
        promoted: str | None = None,
        reset: bool = False,
    ) -> Decision:
        st = self.st
        st.phase = phase  # type: ignore[assignment]
        st.canary = VersionWeight(model_version=canary, weight=weight)
        st.stable = VersionWeight(model_version=st.stable.model_version, weight=100 - weight)
        if canary is None:  # an approval belongs to one rollout
            st.approval_requested_at, st.approved_at = "", ""
        _conditions(
            st,
            self.target,
            self.generation,
            self.now,
            stable_ready=self.stable_ready,
            approval=self.approval,
        )
        return Decision(
            st,
            st.stable.model_version,
            canary,
            weight,
            analyse,
            requeue,
            self.events,
            promoted,
            reset,
            self.clear_approval,
        )

    def record(self, result: str, to_version: str, reason: str) -> None:
        self.st.history = [
            *self.st.history,
            RolloutRecord(
                from_version=self.st.stable.model_version or "",
                to_version=to_version,
                result=result,
                reason=reason[:256],
                finished_at=self.stamp,
            ),
        ][-HISTORY_LIMIT:]

    def rollback(self, canary: str, why: str) -> Decision:
        self.record("RolledBack", canary, why)
        self.events.append(("Warning", reasons.ROLLED_BACK, f"{canary} rolled back: {why}"))
        self.st.failed_checks = 0
        return self.finish("RolledBack", weight=0, canary=None)

    def promote(self, version: str, why: str) -> Decision:
        self.record("Promoted", version, why)
        self.events.append(("Normal", reasons.PROMOTED, f"{version} promoted ({why})"))
        self.st.stable = VersionWeight(model_version=version, weight=100)
        self.st.current_step, self.st.failed_checks = 0, 0
        return self.finish(
            "Serving",
            weight=0,
            canary=None,
            promoted=version,
            reset=self.spec.manual_action != "none",
        )

    def decide(self, *, canary_ready: bool, measurements: Measurements | None) -> Decision:
        st, spec, target = self.st, self.spec, self.target
        stable, canary = st.stable.model_version, st.canary.model_version
        # Nothing resolvable: keep serving what serves.
        if target.version is None:
            return self.finish(
                st.phase or "Pending",
                weight=st.canary.weight if canary else 0,
                canary=canary,
                requeue=self.interval,
            )
        # The first version is served directly: there is nothing to compare a canary with.
        if stable is None:
            st.stable = VersionWeight(model_version=target.version, weight=100)
            self.events.append(("Normal", reasons.SERVING, f"serving {target.version}"))
            return self.finish("Serving" if self.stable_ready else "Pending", weight=0, canary=None)
        if spec.manual_action == "abort" and canary is not None:
            self.record("Aborted", canary, "manualAction: abort")
            self.events.append(("Warning", reasons.ROLLED_BACK, f"{canary} aborted by the user"))
            return self.finish("RolledBack", weight=0, canary=None, reset=True)
        if target.version == stable:
            if canary is not None:
                self.record("Superseded", canary, "the spec returned to the stable version")
            phase = "RolledBack" if st.phase == "RolledBack" and canary is None else "Serving"
            return self.finish(
                phase if self.stable_ready else "Pending",
                weight=0,
                canary=None,
                reset=spec.manual_action != "none",
                requeue=self.interval,
            )
        rolled_back = _last_rolled_back(st)
        if target.version == rolled_back and canary is None and spec.manual_action != "promote":
            # Never retry a version that failed by itself: a new version or a manual
            # promote is needed.
            return self.finish("RolledBack", weight=0, canary=None, requeue=self.interval)
        if canary != target.version:
            return self.start(target.version, canary)
        return self.advance(canary, canary_ready, measurements)

    def start(self, version: str, previous: str | None) -> Decision:
        st, spec = self.st, self.spec
        if previous is not None:
            self.record("Superseded", previous, f"{version} arrived mid-rollout")
        if spec.rollout.strategy == "immediate":
            return self.promote(version, "immediate strategy")
        if spec.manual_action == "promote":
            return self.promote(version, "manualAction: promote")
        st.current_step, st.failed_checks, st.step_started_at = 0, 0, self.stamp
        st.rollout_started_at = self.stamp
        st.approval_requested_at, st.approved_at = "", ""
        st.analysis = []
        weight = spec.rollout.steps[0]
        self.events.append(
            (
                "Normal",
                reasons.CANARY_STARTED,
                f"canary {version} at {weight}% (stable {st.stable.model_version})",
            )
        )
        return self.finish("Progressing", weight=weight, canary=version, requeue=self.interval)

    def advance(
        self, canary: str, canary_ready: bool, measurements: Measurements | None
    ) -> Decision:
        st, spec = self.st, self.spec
        step = min(st.current_step, len(spec.rollout.steps) - 1)
        weight = spec.rollout.steps[step]
        if spec.manual_action == "promote":
            return self.promote(canary, "manualAction: promote")
        if st.approval_requested_at and not st.approved_at and spec.rollout.approval != "manual":
            st.approved_at = self.stamp  # approval was switched off: the wait ends here
        if self.rollout_seconds() > seconds(spec.rollout.max_duration):
            return self.rollback(
                canary, f"not promoted within maxDuration {spec.rollout.max_duration}"
            )
        if spec.paused:
            return self.finish("Paused", weight=weight, canary=canary, requeue=self.interval)
        if st.approval_requested_at and not st.approved_at and self.approval.approves(canary):
            return self.approve(canary, step)
        if not canary_ready:
            st.step_started_at = self.stamp  # the analysis window starts once it serves
            return self.finish("Progressing", weight=weight, canary=canary)
        started = parse_rfc3339(st.step_started_at) or self.now
        due = self.interval - (self.now - started).total_seconds()
        if due > 0:
            return self.finish("Progressing", weight=weight, canary=canary, requeue=due)
        if measurements is None:
            return self.finish("Progressing", weight=weight, canary=canary, analyse=True)
        return self.conclude(canary, step, weight, judge(spec, measurements, step, self.now))

    def conclude(
        self, canary: str, step: int, weight: int, results: list[AnalysisResult]
    ) -> Decision:
        st, spec = self.st, self.spec
        held_before = any(r.step == step and r.verdict == "Inconclusive" for r in st.analysis)
        st.analysis = [*st.analysis, *results][-64:]
        st.step_started_at = self.stamp
        failed = [r for r in results if r.verdict == "Fail"]
        if failed:
            st.failed_checks += 1
            what = ", ".join(f"{r.check}={r.value:.4g}" for r in failed if r.value is not None)
            limit = spec.rollout.analysis.failure_limit
            if st.failed_checks >= limit:
                return self.rollback(canary, f"failed analysis at {weight}%: {what}")
            self.events.append(
                (
                    "Warning",
                    reasons.ANALYSIS_FAILED,
                    f"{canary} at {weight}%: {what} ({st.failed_checks}/{limit})",
                )
            )
            return self.finish("Progressing", weight=weight, canary=canary, requeue=self.interval)
        held = [r.check for r in results if r.verdict == "Inconclusive"]
        if held:
            if not held_before:  # one Event per held step, not one per interval
                self.events.append(
                    (
                        "Normal",
                        reasons.ANALYSIS_INCONCLUSIVE,
                        f"{canary} held at {weight}%: no verdict on {', '.join(held)}",
                    )
                )
            return self.finish("Progressing", weight=weight, canary=canary, requeue=self.interval)
        if step + 1 >= len(spec.rollout.steps):
            return self.promote(canary, "every step passed analysis")
        if step + 2 == len(spec.rollout.steps) and spec.rollout.approval == "manual":
            return self.await_approval(canary, step, weight)
        st.current_step = step + 1
        weight = spec.rollout.steps[step + 1]
        self.events.append(("Normal", reasons.CANARY_ADVANCED, f"{canary} advanced to {weight}%"))
        return self.finish("Progressing", weight=weight, canary=canary, requeue=self.interval)

    def await_approval(self, canary: str, step: int, weight: int) -> Decision:
        """The step before the last passed: take the last one only once approved."""
        st = self.st
        if self.approval.approves(canary):  # approved before it had to wait
            return self.approve(canary, step)
        if not st.approval_requested_at:  # one Event when the wait begins
            st.approval_requested_at = self.stamp
            self.events.append(
                (
                    "Normal",
                    reasons.AWAITING_APPROVAL,
                    f"{canary} passed analysis at {weight}% and waits for approval to take "
                    f"the last step: {self.approval.command(canary)}",
                )
            )
        return self.finish("Progressing", weight=weight, canary=canary, requeue=self.interval)

    def approve(self, canary: str, step: int) -> Decision:
        st = self.st
        st.approval_requested_at = st.approval_requested_at or self.stamp
        st.approved_at = self.stamp
        st.current_step, st.step_started_at = step + 1, self.stamp
        weight = self.spec.rollout.steps[step + 1]
        self.clear_approval = True  # `true` approves this canary, not every later one
        self.events.append(
            (
                "Normal",
                reasons.APPROVED,
                f"{canary} approved ({APPROVE_ANNOTATION}={self.approval.value}): "
                f"advanced to {weight}%",
            )
        )
        return self.finish("Progressing", weight=weight, canary=canary, requeue=self.interval)

    def rollout_seconds(self) -> float:
        """How long the rollout has run, less its wait for approval (which may be long)."""
        st = self.st
        elapsed = (self.now - (parse_rfc3339(st.rollout_started_at) or self.now)).total_seconds()
        asked = parse_rfc3339(st.approval_requested_at)
        if asked is not None:
            answered = parse_rfc3339(st.approved_at) or self.now
            elapsed -= max(0.0, (answered - asked).total_seconds())
        return elapsed


def _last_rolled_back(status: ModelDeploymentStatus) -> str | None:
    last = status.history[-1] if status.history else None
    return last.to_version if last and last.result in ("RolledBack", "Aborted") else None


def degrade(
    st: ModelDeploymentStatus, reason: str, message: str, generation: int, now: dt.datetime
) -> list[Condition]:
    """Conditions with Degraded=True for a failure outside the rollout's own logic."""
    return set_condition(
        st.conditions, reasons.DEGRADED, "True", reason, message, generation=generation, now=now
    )


def _conditions(
    st: ModelDeploymentStatus,
    target: Target,
    generation: int,
    now: dt.datetime,
    *,
    stable_ready: bool,
    approval: Approval,
) -> None:
    conds = st.conditions
    serving = st.stable.model_version is not None and stable_ready
    ready_reason, ready_message = (
        reasons.SERVING,
        f"{st.stable.model_version} serves {st.stable.weight}%",
    )
    if not serving:  # why not, when the spec or its version says so
        ready_reason = (
            (target.reason or reasons.INVALID_SPEC) if target.problem else reasons.NOT_SERVING
        )
        ready_message = target.problem or "no ready stable version yet"
    conds = set_condition(
        conds,
        reasons.READY,
        "True" if serving else "False",
        ready_reason,
        ready_message,
        generation=generation,
        now=now,
    )
    canary = st.canary.model_version
    reason, message = reasons.RECONCILED, ""
    if canary is not None:
        reason, message = reasons.CANARY_STARTED, f"canary {canary} at {st.canary.weight}%"
    if canary is not None and st.approval_requested_at and not st.approved_at:
        other = approval.value is not None and not approval.approves(canary)
        reason, message = (
            reasons.AWAITING_APPROVAL,
            f"canary {canary} passed analysis at {st.canary.weight}% and waits for approval "
            f"to take the last step: {approval.command(canary)}"
            + (f" ({APPROVE_ANNOTATION}={approval.value} names another version)" if other else ""),
        )
    elif canary is not None and st.approved_at:
        reason, message = reasons.APPROVED, f"canary {canary} at {st.canary.weight}%, approved"
    conds = set_condition(
        conds,
        reasons.PROGRESSING,
        "True" if canary is not None else "False",
        reason,
        message,
        generation=generation,
        now=now,
    )
    degraded_reason, degraded_msg = "", ""
    if target.problem:
        degraded_reason, degraded_msg = target.reason or reasons.INVALID_SPEC, target.problem
    elif st.phase == "RolledBack" and st.history:
        degraded_reason, degraded_msg = reasons.ROLLED_BACK, st.history[-1].reason
    conds = set_condition(
        conds,
        reasons.DEGRADED,
        "True" if degraded_reason else "False",
        degraded_reason or reasons.RECONCILED,
        degraded_msg,
        generation=generation,
        now=now,
    )
    st.conditions = conds
