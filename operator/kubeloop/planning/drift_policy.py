"""A DriftPolicy's decision: the breach clock, the storm governor, the retrain it creates.

Pure: a function of the spec, the status, what one pass observed and the clock.

- **Breach clock** (a Prometheus alert's ``for``): a breaching evaluation starts it, a passing one
  stops it, an inconclusive one neither advances the decision nor resets it. The policy acts
  when the latest evaluation breaches and the clock has run for ``for``.
- **Storm governor**: one retrain in flight (until its outcome is known: promoted, rolled back,
  gates failed, failed), ``cooldown`` after the last start, ``maxRetrainsPerDay`` in any 24 h.
  The child's name is ``<policy>-retrain-<n>`` with n the retrain count in status, so an
  operator restarted between creating the child and writing status finds it (it carries the
  policy's label) and adopts it instead of creating a second one.
- **Re-baseline**: the signals compare against the deployment's *stable* version; when that
  changes (a retrain was promoted) the breach clock restarts on the new reference.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from kubeloop import reasons
from kubeloop.api.drift_policy import (
    DriftPolicy,
    DriftPolicyStatus,
    EvaluationRecord,
    Phase,
    RetrainRecord,
    SignalValue,
)
from kubeloop.contract.durations import parse_rfc3339, rfc3339, seconds
from kubeloop.contract.labels import (
    RETRAIN_REASON_ANNOTATION,
)
from kubeloop.planning.conditions import set_condition
from kubeloop.planning.drift_signals import Result, overall, top_features
from kubeloop.planning.retrain import Child, Served, child_name, outcome_of, retrain_body

HISTORY: Final = 30
RETRAINS_KEPT: Final = 30
FINAL_OUTCOMES: Final = frozenset({"Promoted", "RolledBack", "GatesFailed", "Failed"})
DAY_S: Final = 86_400.0

Event = tuple[str, str, str]


@dataclass(frozen=True)
class Observed:
    """What one pass read. ``problem`` (reason, message naming the field) stops evaluation;
    ``results`` is None when no evaluation was due; ``template`` is the spec to copy for a
    retrain (camelCase, as the API server returns it), or None with ``template_problem``."""

    now: dt.datetime
    served: Served | None = None
    problem: tuple[str, str] | None = None
    results: Sequence[Result] | None = None
    children: Mapping[str, Child] = field(default_factory=dict)
    template: Mapping[str, Any] | None = None
    template_problem: str = ""
    unavailable: str = ""  # why the window could not be read (e.g. Prometheus unreachable)


@dataclass
class Decision:
    status: DriftPolicyStatus
    create: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    requeue_after: float = 2.0
    firing: bool = False  # the breach held for `for` (the kubeloop_drift_breached gauge)


def evaluation_due(policy: DriftPolicy, now: dt.datetime) -> bool:
    last = parse_rfc3339(policy.status.last_evaluated_at)
    return last is None or (now - last).total_seconds() >= seconds(policy.spec.interval) - 0.05


def plan(policy: DriftPolicy, obs: Observed) -> Decision:
    spec, now = policy.spec, obs.now
    status = policy.status.model_copy(deep=True)
    status.observed_generation = policy.metadata.generation
    decision = Decision(status)
    gen = policy.metadata.generation
    if obs.served is not None:
        _adopt(policy, status, obs)
        _track(status, obs, decision)
        _rebaseline(status, obs.served, decision)
    active = _active(status)
    status.active_training_run = active.training_run if active else ""
    status.retrains_today = sum(1 for r in status.retrains if _age_s(r.started_at, now) < DAY_S)
    if obs.problem is not None:
        reason, message = obs.problem
        status.phase = "Watching" if reason == reasons.NOT_SERVING else "Failed"
        status.conditions = set_condition(
            status.conditions, reasons.READY, "False", reason, message, generation=gen, now=now
        )
        decision.requeue_after = min(seconds(spec.interval), 30.0)
        return decision
    if obs.results is not None:
        _record(policy, status, obs.results, now, decision)
    current = _current_outcome(status)
    held_s = _age_s(status.breaching_since, now) if status.breaching_since else 0.0
    firing = current == "Breach" and held_s >= seconds(spec.for_) - 0.05
    decision.firing = firing
    last = parse_rfc3339(status.last_evaluated_at)
    wait = seconds(spec.interval) - ((now - last).total_seconds() if last else 0.0)
    decision.requeue_after = max(0.2, wait)
    if obs.results is None and not _settles(policy, status, active):
        return decision  # nothing measured, nothing finished: the last evaluation's word stands
    held = Held()
    if obs.results is not None:
        held = _refusal(policy, obs)
        if firing and not spec.suspend and not held.refused:
            held = _act(policy, status, obs, decision, active)
    active = _active(status)
    status.active_training_run = active.training_run if active else ""
    status.phase = _phase(policy, current=current, firing=firing, active=active, held=held)
    ready_reason, ready_message = _ready(policy, status, held)
    status.conditions = set_condition(
        status.conditions,
        reasons.READY,
        "False" if held.refused else "True",
        ready_reason,
        ready_message,
        generation=gen,
        now=now,
    )
    status.conditions = set_condition(
        status.conditions,
        reasons.DRIFTED,
        "True" if firing else "False",
        reasons.DRIFT_DETECTED if firing else reasons.WATCHING,
        status.drift_score or "no evaluation yet",
        generation=gen,
        now=now,
    )
    return decision


def _settles(policy: DriftPolicy, status: DriftPolicyStatus, active: RetrainRecord | None) -> bool:
    """Between evaluations the summary changes only when a retrain started or ended, or the
    policy just recovered from a problem (or was suspended or resumed)."""
    was = policy.status.phase
    in_flight = was in ("Retraining", "AwaitingApproval")
    return (
        was in ("", "Failed")
        or in_flight != (active is not None)
        or (active is not None and active != _active(policy.status))
        or (was == "Suspended") != policy.spec.suspend
    )


def _active(status: DriftPolicyStatus) -> RetrainRecord | None:
    """The retrain in flight (at most one: the governor starts none while one is)."""
    return next((r for r in status.retrains if r.outcome not in FINAL_OUTCOMES), None)


def _refusal(policy: DriftPolicy, obs: Observed) -> Held:
    """What makes an evaluation pass Ready=False although nothing may be wrong with the data:
    no window could be read, or a retrain could not be created if one were due."""
    if obs.unavailable:
        return Held(reasons.PROMETHEUS_UNAVAILABLE, obs.unavailable, refused=True)
    if policy.spec.action.mode == "retrain" and obs.template is None and obs.template_problem:
        return Held(reasons.TEMPLATE_NOT_FOUND, obs.template_problem, refused=True)
    return Held()


# --- retrains ------------------------------------------------------------------------------


def _adopt(policy: DriftPolicy, status: DriftPolicyStatus, obs: Observed) -> None:
    """Children created after the last retrain the status counts (just before a restart that
    lost the status write) join the record. Older ones are known, or were trimmed from it."""
    for name in sorted(obs.children, key=_child_index):
        if _child_index(name) <= status.retrain_count:
            continue
        status.retrains.append(
            RetrainRecord(
                training_run=name,
                started_at=rfc3339(obs.now),
                reason="found after a restart",
            )
        )
        status.retrain_count = max(status.retrain_count, _child_index(name))
        status.last_retrain_at = status.last_retrain_at or rfc3339(obs.now)
    del status.retrains[:-RETRAINS_KEPT]


def _child_index(name: str) -> int:
    match = re.search(r"-retrain-(\d+)$", name)
    return int(match.group(1)) if match else 0


def _track(status: DriftPolicyStatus, obs: Observed, decision: Decision) -> None:
    """Follow every unfinished retrain: its run, then its version's rollout."""
    served = obs.served
    assert served is not None
    for record in status.retrains:
        if record.outcome in FINAL_OUTCOMES:
            continue
        outcome, why = outcome_of(obs.children.get(record.training_run), served)
        child = obs.children.get(record.training_run)
        if child is not None and child.model_version:
            record.model_version = child.model_version
        if outcome == record.outcome:
            continue
        record.outcome = outcome  # type: ignore[assignment]
        if outcome in FINAL_OUTCOMES:
            record.finished_at = rfc3339(obs.now)
            kind = "Normal" if outcome == "Promoted" else "Warning"
            decision.events.append(
                (kind, reasons.RETRAIN_FINISHED, f"retrain {record.training_run}: {outcome}{why}")
            )
        elif outcome == "AwaitingApproval":
            decision.events.append(
                (
                    "Normal",
                    reasons.AWAITING_APPROVAL,
                    f"retrain {record.training_run} waits for approval: kubectl annotate "
                    f"trainingrun {record.training_run} kubeloop.dev/approve=true",
                )
            )


def _rebaseline(status: DriftPolicyStatus, served: Served, decision: Decision) -> None:
    if not served.stable or served.stable == status.baseline_version:
        return
    if status.baseline_version:
        decision.events.append(
            (
                "Normal",
                reasons.REBASELINED,
                f"now comparing against {served.stable}'s reference (was "
                f"{status.baseline_version}); the breach clock restarts",
            )
        )
    status.baseline_version = served.stable
    status.breaching_since = ""
    status.signals = []
    status.top_features = []
    status.drift_score = ""


# --- evaluations -----------------------------------------------------------------------------


def _record(
    policy: DriftPolicy,
    status: DriftPolicyStatus,
    results: Sequence[Result],
    now: dt.datetime,
    decision: Decision,
) -> None:
    stamp = rfc3339(now)
    before = {s.name: s for s in status.signals}
    status.signals = [
        SignalValue(
            name=r.name,
            value=r.value,
            threshold=r.threshold,
            count=r.count,
            outcome=r.outcome,
            feature=r.feature,
            message=r.message,
            since=(
                (
                    before[r.name].since
                    if r.name in before and before[r.name].outcome == "Breach"
                    else stamp
                )
                if r.outcome == "Breach"
                else ""
            ),
        )
        for r in results
    ]
    status.top_features = top_features(results)
    worst = max(results, key=lambda r: r.margin, default=None)
    status.drift_score = _score(worst) if worst and worst.value is not None else ""
    outcome = overall(results)
    status.history = [
        *status.history,
        EvaluationRecord(time=stamp, outcome=outcome, score=status.drift_score),
    ][-HISTORY:]
    status.last_evaluated_at = stamp
    # (observe mode says it in status only; a retrain in flight is already the answer)
    notify = policy.spec.action.mode != "observe" and not status.active_training_run
    if outcome == "Breach" and not status.breaching_since:
        status.breaching_since = stamp
        if notify:
            decision.events.append(
                ("Warning", reasons.DRIFT_DETECTED, f"breach: {_breaching(results)}")
            )
    elif outcome == "Pass" and status.breaching_since:
        status.breaching_since = ""
        if notify:
            decision.events.append(
                ("Normal", reasons.DRIFT_CLEARED, f"no signal breaches ({status.drift_score})")
            )


def _score(r: Result) -> str:
    """e.g. ``psi[amount]=0.41 > 0.12`` (breaching) or ``psi[amount]=0.03 (limit 0.12)``."""
    limit = f"{r.threshold:.3g}" if r.threshold is not None else "?"
    if r.outcome == "Breach":
        return f"{r.score_text()} {'<' if r.below else '>'} {limit}"[:128]
    return f"{r.score_text()} (limit {limit})"[:128]


def _breaching(results: Sequence[Result]) -> str:
    parts = [
        f"{r.name} {r.score_text()} vs {r.threshold:.3g} (n={r.count or 0:.0f})"
        for r in results
        if r.outcome == "Breach" and r.threshold is not None
    ]
    return "; ".join(parts)[:900]


def _current_outcome(status: DriftPolicyStatus) -> str:
    return status.history[-1].outcome if status.history else "Inconclusive"


# --- acting ----------------------------------------------------------------------------------


def _act(
    policy: DriftPolicy,
    status: DriftPolicyStatus,
    obs: Observed,
    decision: Decision,
    active: RetrainRecord | None,
) -> Held:
    """The breach held for ``for``: notify, render or retrain; or why not."""
    action, now = policy.spec.action, obs.now
    results = obs.results or []
    was_drifted = policy.status.phase in ("Drifted", "Cooldown", "Retraining")
    if action.mode == "notify":
        if not was_drifted:
            decision.events.append(
                (
                    "Warning",
                    reasons.DRIFT_DETECTED,
                    f"held for {policy.spec.for_}: {_breaching(results)}",
                )
            )
        return Held()
    if action.mode != "retrain":
        return Held()
    if active is not None:
        return Held(
            reasons.RETRAIN_HELD,
            f"retrain {active.training_run} is still in flight ({active.outcome})",
        )
    last = parse_rfc3339(status.last_retrain_at)
    if last is not None and (now - last).total_seconds() < seconds(action.cooldown):
        left = seconds(action.cooldown) - (now - last).total_seconds()
        return _held(policy, decision, f"cooldown: {left:.0f}s left of {action.cooldown}")
    if status.retrains_today >= action.max_retrains_per_day:
        return _held(
            policy,
            decision,
            f"daily cap: {status.retrains_today} of maxRetrainsPerDay="
            f"{action.max_retrains_per_day} retrains in the last 24 h",
        )
    if obs.template is None:
        return Held(
            reasons.TEMPLATE_NOT_FOUND,
            obs.template_problem or "spec.action.template: no template TrainingRun",
            refused=True,
        )
    served = obs.served
    assert served is not None
    if action.data != "template" and not served.request_log_uri:
        return Held(
            reasons.INVALID_SPEC,
            f"spec.action.data={action.data} needs the deployment's request log, and "
            f"{policy.spec.target.name} has none (spec.serving.monitoring.requestLog, or an "
            "object store for remote servers)",
            refused=True,
        )
    name = child_name(policy.name, status.retrain_count + 1)
    body = retrain_body(policy, obs.template, served, status, results, name=name, now=now)
    if action.dry_run:
        status.dry_run_training_run = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if policy.status.phase != "Drifted":  # once a breach: it stays Drifted while it holds
            decision.events.append(
                (
                    "Normal",
                    reasons.DRY_RUN,
                    f"dryRun: would create TrainingRun {name} (status.dryRunTrainingRun)",
                )
            )
        return Held()
    if name not in obs.children:
        decision.create = body
    reason = body["metadata"]["annotations"][RETRAIN_REASON_ANNOTATION]
    status.retrains = [
        *status.retrains,
        RetrainRecord(
            training_run=name,
            started_at=rfc3339(now),
            outcome="AwaitingApproval" if action.approval == "manual" else "Training",
            reason=reason[:256],
        ),
    ][-RETRAINS_KEPT:]
    status.retrain_count += 1
    status.last_retrain_at = rfc3339(now)
    status.retrains_today += 1
    status.breaching_since = ""  # the clock restarts once the retrain has answered
    decision.events.append(("Normal", reasons.RETRAIN_STARTED, f"TrainingRun {name}: {reason}"))
    return Held()


@dataclass(frozen=True)
class Held:
    """Why a breach that held for ``for`` created nothing ('' reason: it acted, or had
    nothing to create); ``refused``: the spec or the cluster must change (Ready=False)."""

    reason: str = ""
    message: str = ""
    refused: bool = False
    cooldown: bool = False


def _held(policy: DriftPolicy, decision: Decision, why: str) -> Held:
    if policy.status.phase != "Cooldown":
        decision.events.append(("Normal", reasons.RETRAIN_HELD, f"drift holds, no retrain: {why}"))
    return Held(reasons.RETRAIN_HELD, why, cooldown=True)


# --- summary ---------------------------------------------------------------------------------


def _phase(
    policy: DriftPolicy,
    *,
    current: str,
    firing: bool,
    active: RetrainRecord | None,
    held: Held,
) -> Phase:
    if policy.spec.suspend:
        return "Suspended"
    if active is not None:
        return "AwaitingApproval" if active.outcome == "AwaitingApproval" else "Retraining"
    if held.cooldown:
        return "Cooldown"
    if firing:
        return "Drifted"
    if current == "Breach":
        return "Pending"
    return "Watching"


def _ready(policy: DriftPolicy, status: DriftPolicyStatus, held: Held) -> tuple[str, str]:
    if held.reason:
        return held.reason, held.message
    if not status.history:
        return reasons.WATCHING, f"watching {policy.spec.target.name}; first evaluation pending"
    last = status.history[-1]
    if last.outcome == "Inconclusive":
        why = "; ".join(
            f"{s.name}: {s.message}" for s in status.signals if s.outcome == "Inconclusive"
        )
        return reasons.INCONCLUSIVE, f"latest evaluation inconclusive ({why})"[:1000]
    return reasons.WATCHING, f"latest evaluation {last.outcome}: {last.score}"


def _age_s(stamp: str, now: dt.datetime) -> float:
    when = parse_rfc3339(stamp)
    return (now - when).total_seconds() if when else float("inf")
