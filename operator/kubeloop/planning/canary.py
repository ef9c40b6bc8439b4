"""The rollout as a pure function: (spec, status, what the world looks like, now) → decision.

Flagger's and Argo Rollouts' hardest bugs were missing metrics that promoted a canary; here a
check without data is *Inconclusive*, and an inconclusive step is held, never promoted.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

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
from kubeloop.planning.conditions import set_condition

HISTORY_LIMIT = 20


@dataclass(frozen=True)
class Measurements:
    """What Prometheus said about the canary (and stable) over the last interval.
    None means no data: empty, NaN or unreachable series."""

    requests: float | None = None
    error_rate: float | None = None
    p99_latency_ms: float | None = None
    prediction_shift: float | None = None
    custom: Mapping[str, float | None] = field(default_factory=dict)


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
) -> Decision:
    """One step of the rollout state machine."""
    rollout = _Rollout(
        spec, status, target, generation=generation, stable_ready=stable_ready, now=now
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
    ) -> None:
        self.spec, self.target, self.now = spec, target, now
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
        _conditions(st, self.target, self.generation, self.now, self.stable_ready)
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
        started_rollout = parse_rfc3339(st.rollout_started_at) or self.now
        if (self.now - started_rollout).total_seconds() > seconds(spec.rollout.max_duration):
            return self.rollback(
                canary, f"not promoted within maxDuration {spec.rollout.max_duration}"
            )
        if spec.paused:
            return self.finish("Paused", weight=weight, canary=canary, requeue=self.interval)
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
        st.current_step = step + 1
        weight = spec.rollout.steps[step + 1]
        self.events.append(("Normal", reasons.CANARY_ADVANCED, f"{canary} advanced to {weight}%"))
        return self.finish("Progressing", weight=weight, canary=canary, requeue=self.interval)


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
    st: ModelDeploymentStatus, target: Target, generation: int, now: dt.datetime, stable_ready: bool
) -> None:
    conds = st.conditions
    serving = st.stable.model_version is not None and stable_ready
    conds = set_condition(
        conds,
        reasons.READY,
        "True" if serving else "False",
        reasons.SERVING if serving else reasons.NOT_SERVING,
        f"{st.stable.model_version} serves {st.stable.weight}%"
        if serving
        else "no ready stable version yet",
        generation=generation,
        now=now,
    )
    progressing = st.canary.model_version is not None
    conds = set_condition(
        conds,
        reasons.PROGRESSING,
        "True" if progressing else "False",
        reasons.CANARY_STARTED if progressing else reasons.RECONCILED,
        f"canary {st.canary.model_version} at {st.canary.weight}%" if progressing else "",
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
