"""TrainingRun: the pure state machine behind ``kubectl get tr``.

``plan_training`` takes the run as it is (spec, status, generation), what the handler observed
(compiled pipeline, GPU budget, the executor's view of the run, the steps' progress records,
the evaluation, the registration) and the clock, and returns the next status plus what to do:
submit the attempt, cancel a superseded run, register the model. No I/O here.

Phases: Pending → (Suspended) → (Queued) → Running → Succeeded | Failed. A spec change (new
generation) supersedes the current attempt and starts a new one; a cron ``schedule`` starts a
new attempt of the same spec when it is due. Earlier attempts are kept in ``status.history``.
``spec.suspend`` holds an attempt that is not submitted yet until the run is approved (the
annotation ``kubeloop.dev/approve=true``) or suspend is set to false; the pipeline is compiled
without it, so changing only ``suspend`` leaves the pipeline hash alone and starts no attempt.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from croniter import croniter

from kubeloop import reasons
from kubeloop.api.training_run import (
    Attempt,
    DataSnapshot,
    TrainingRunSpec,
    TrainingRunStatus,
    Trials,
)
from kubeloop.contract.durations import parse_rfc3339, rfc3339, seconds
from kubeloop.contract.evaluation import (
    METRICS_BY_TASK,
    QUALITY_METRICS_BY_TASK,
    RANKING_METRICS,
    gate_metrics,
)
from kubeloop.contract.labels import APPROVE_ANNOTATION
from kubeloop.contract.steps import STEPS
from kubeloop.planning.conditions import set_condition

RunState = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]
ACTIVE = ("Pending", "Suspended", "Queued", "Running")
NOT_SUBMITTED = ("Pending", "Suspended", "Queued")
TERMINAL = ("Succeeded", "Failed")
HISTORY_LIMIT = 20
POLL_RUNNING_S = 2.0
POLL_QUEUED_S = 5.0
IDLE_S = 300.0


@dataclass(frozen=True)
class RunView:
    """The executor's view of the current attempt's run."""

    state: RunState
    message: str = ""
    failed_step: str = ""
    log_tail: str = ""


@dataclass(frozen=True)
class Observed:
    """Everything the handler looked at for this pass."""

    generation: int
    now: dt.datetime
    name: str = ""  # the TrainingRun's (for the approval command)
    namespace: str = ""
    approved: bool = False  # the annotation kubeloop.dev/approve is "true"
    spec_hash: str = ""  # of the pipeline compiled from the spec (pipeline_spec)
    compile_error: str = ""  # the spec cannot be compiled (or is refused); names the field
    compile_reason: str = reasons.INVALID_SPEC  # e.g. DataOutsideTenantPrefix
    gpu_limit: int | None = None  # GPUs the namespace's TrainingRuns may hold; None = no limit
    gpu_limit_source: str = ""  # e.g. "ResourceQuota gpu-quota" or "operator setting"
    gpu_in_use: int = 0  # by the namespace's other running TrainingRuns
    run: RunView | None = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None  # evaluation.json, once the run succeeded
    manifest: bool = False  # the register step wrote its ModelVersion manifest
    registered: str = ""  # ModelVersion registered for this attempt ('' = not yet)
    artifacts: dict[str, str] = field(default_factory=dict)


@dataclass
class Decision:
    status: TrainingRunStatus
    submit: bool = False
    cancel_run_id: str = ""
    cancel_attempt: int = 0
    register: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float = POLL_RUNNING_S


def spec_problem(spec: TrainingRunSpec) -> str:
    """What makes the spec impossible to run, found before any pipeline starts ('' if none):
    a gate or a tuning objective on a metric the task does not produce."""
    task = spec.data.task
    produced = METRICS_BY_TASK[task]
    gated = gate_metrics(task, ranked=spec.data.group_column is not None)
    for i, gate in enumerate(spec.evaluation.gates):
        if gate.metric not in gated:
            return (
                f"spec.evaluation.gates[{i}].metric={gate.metric!r} is not produced for a {task} "
                f"task; expected one of {', '.join(gated)}"
            )
    if spec.tuning is not None and spec.tuning.objective.metric in RANKING_METRICS:
        # tuning scores validation rows one by one (ml/train.score): no groups to rank there
        return (
            f"spec.tuning.objective.metric={spec.tuning.objective.metric!r} is a test-split "
            "ranking metric and cannot be tuned on; tune on a validation metric of the task "
            f"({', '.join(QUALITY_METRICS_BY_TASK[task])}) and gate on it instead"
        )
    if spec.tuning is not None and spec.tuning.objective.metric not in produced:
        return (
            f"spec.tuning.objective.metric={spec.tuning.objective.metric!r} is not produced for "
            f"a {task} task; expected one of {', '.join(produced)}"
        )
    return ""


def pipeline_spec(spec: TrainingRunSpec) -> TrainingRunSpec:
    """The spec the pipeline is compiled from: ``suspend`` only gates the submission, so it
    is left out (a run suspended or resumed later keeps its pipeline hash)."""
    return spec.model_copy(update={"suspend": False}) if spec.suspend else spec


def is_approved(annotations: Mapping[str, str]) -> bool:
    """The run's annotations approve it: ``kubeloop.dev/approve`` is exactly ``true``."""
    return annotations.get(APPROVE_ANNOTATION) == "true"


def awaiting_approval(spec: TrainingRunSpec, approved: bool) -> bool:
    """Whether an attempt not submitted yet must wait: suspended and not approved."""
    return spec.suspend and not approved


def approve_command(obs: Observed) -> str:
    where = f" -n {obs.namespace}" if obs.namespace else ""
    return f"kubectl annotate trainingrun {obs.name or 'NAME'} {APPROVE_ANNOTATION}=true{where}"


def spec_changed(
    status: TrainingRunStatus, *, generation: int, spec_hash: str, compile_error: str
) -> bool:
    """A new generation whose pipeline is not the current attempt's. Every field but
    ``suspend`` is part of the compiled pipeline, so a change of only ``suspend`` is none."""
    if status.observed_generation == generation:
        return False
    return not spec_hash or bool(compile_error) or spec_hash != status.spec_hash


def needs_new_attempt(spec: TrainingRunSpec, status: TrainingRunStatus, obs: Observed) -> str:
    """Why a new attempt starts now ('' if none): first run, a spec change, or the schedule."""
    if status.attempt == 0:
        return "first attempt"
    if spec_changed(
        status, generation=obs.generation, spec_hash=obs.spec_hash, compile_error=obs.compile_error
    ):
        return f"spec changed (generation {status.observed_generation} → {obs.generation})"
    if spec.schedule and status.phase in TERMINAL:
        due = next_scheduled(spec.schedule, status)
        if due is not None and obs.now >= due:
            return f"schedule {spec.schedule!r} is due"
    return ""


def next_scheduled(schedule: str, status: TrainingRunStatus) -> dt.datetime | None:
    """When the cron schedule next fires after the current attempt started (None: never, as
    for a schedule the calendar cannot meet, which the spec rules refuse)."""
    base = parse_rfc3339(status.last_scheduled_at or status.started_at)
    if base is None or not croniter.is_valid(schedule):
        return None
    nxt: dt.datetime = croniter(schedule, base).get_next(dt.datetime)
    return nxt if nxt.tzinfo else nxt.replace(tzinfo=dt.UTC)


def is_idle(
    spec: TrainingRunSpec, status: TrainingRunStatus, generation: int, now: dt.datetime
) -> bool:
    """Nothing to do until the spec changes or the schedule fires."""
    if status.attempt == 0 or status.observed_generation != generation:
        return False
    if status.phase not in TERMINAL:
        return False
    if spec.schedule:
        due = next_scheduled(spec.schedule, status)
        return due is None or now < due
    return True


def _start_attempt(
    status: TrainingRunStatus, obs: Observed, why: str, *, scheduled: bool
) -> tuple[TrainingRunStatus, str, list[tuple[str, str, str]]]:
    """A fresh status for attempt n+1; the previous attempt moves to history."""
    events: list[tuple[str, str, str]] = []
    cancel = ""
    history = list(status.history)
    if status.attempt > 0:
        result = status.phase if status.phase in TERMINAL else "Superseded"
        if result == "Superseded" and status.run_id:
            cancel = status.run_id
            events.append(
                ("Normal", reasons.SUPERSEDED, f"attempt {status.attempt} superseded: {why}")
            )
        history.append(
            Attempt(
                number=status.attempt,
                generation=status.observed_generation,
                run_id=status.run_id,
                result=result,
                finished_at=status.completed_at or rfc3339(obs.now),
            )
        )
    new = TrainingRunStatus(
        phase="Pending",
        attempt=status.attempt + 1,
        observed_generation=obs.generation,
        spec_hash=obs.spec_hash,
        history=history[-HISTORY_LIMIT:],
        conditions=list(status.conditions),
        started_at=rfc3339(obs.now),
        last_scheduled_at=rfc3339(obs.now) if scheduled else status.last_scheduled_at,
        # the last registered model stays visible until this attempt registers a new one
        model_version=status.model_version,
    )
    events.append(("Normal", reasons.ATTEMPT_STARTED, f"attempt {new.attempt}: {why}"))
    return new, cancel, events


def _ready(
    status: TrainingRunStatus,
    obs: Observed,
    value: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
) -> None:
    _condition(status, obs, type_="Ready", value=value, reason=reason, message=message)


def _condition(
    status: TrainingRunStatus,
    obs: Observed,
    *,
    type_: str,
    value: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
) -> None:
    status.conditions = set_condition(
        status.conditions, type_, value, reason, message, generation=obs.generation, now=obs.now
    )


def _fail(
    status: TrainingRunStatus, obs: Observed, reason: str, message: str
) -> list[tuple[str, str, str]]:
    status.phase = "Failed"
    status.completed_at = rfc3339(obs.now)
    _ready(status, obs, "False", reason, message)
    return [("Warning", reason, message)]


def _gpu_check(
    spec: TrainingRunSpec, obs: Observed
) -> tuple[Literal["ok", "queued", "impossible"], str]:
    want = spec.resources.gpu
    if want == 0 or obs.gpu_limit is None:
        return "ok", ""
    source = obs.gpu_limit_source or "GPU budget"
    if want > obs.gpu_limit:
        return "impossible", (
            f"spec.resources.gpu={want} exceeds the namespace's GPU budget of {obs.gpu_limit} "
            f"({source}); it could never run: lower spec.resources.gpu or raise the budget"
        )
    if obs.gpu_in_use + want > obs.gpu_limit:
        return "queued", (
            f"waiting for GPUs: spec.resources.gpu={want}, {obs.gpu_in_use} of {obs.gpu_limit} "
            f"in use by other TrainingRuns in this namespace ({source})"
        )
    return "ok", ""


def _step_order(record: dict[str, Any]) -> tuple[str, int]:
    """Later start first; steps started in the same instant by their place in the pipeline."""
    step = str(record.get("step", ""))
    return str(record.get("startedAt", "")), STEPS.index(step) if step in STEPS else -1


def _progress(status: TrainingRunStatus, steps: dict[str, dict[str, Any]]) -> str:
    """Current step, trials and a message from the steps' progress records."""
    running = [r for r in steps.values() if r.get("state") == "Running"]
    done = [r for r in steps.values() if r.get("state") == "Succeeded"]
    current = max(running or done, key=_step_order, default=None)
    message = ""
    if current is not None:
        status.current_step = str(current.get("step", ""))
        message = str(current.get("message", ""))
    tune = steps.get("tune", {}).get("trials")
    if isinstance(tune, dict):
        best = tune.get("bestParams") or {}
        status.trials = Trials(
            completed=int(tune.get("completed", 0)),
            total=int(tune.get("total", 0)),
            pruned=int(tune.get("pruned", 0)),
            progress=f"{int(tune.get('completed', 0))}/{int(tune.get('total', 0))}",
            best_params={str(k): str(v)[:256] for k, v in list(best.items())[:32]},
            best_value=None if tune.get("bestValue") is None else float(tune["bestValue"]),
        )
    snapshot = data_snapshot(steps.get("ingest", {}))
    if snapshot is not None:
        status.data = snapshot
    return message


def data_snapshot(ingest: Mapping[str, Any]) -> DataSnapshot | None:
    """``status.data`` from the ingest step's record: what it read and its fingerprint (only
    once ingest succeeded — a failed or running ingest has trained on nothing yet)."""
    data = ingest.get("data")
    if ingest.get("state") != "Succeeded" or not isinstance(data, dict):
        return None
    try:
        return DataSnapshot(
            uri=str(data.get("uri") or "")[:1024],
            fingerprint=str(data.get("fingerprint") or "")[:128],
            rows=max(0, int(data.get("rows") or 0)),
            sources=max(0, int(data.get("sources") or 0)),
            cached=bool(ingest.get("cached", False)),
        )
    except (TypeError, ValueError):  # a record the step did not write: show nothing
        return None


def _best_metric(spec: TrainingRunSpec, metrics: dict[str, float]) -> str:
    """The metric a person looks at first: the objective, else the first gate, else f1/r2."""
    candidates = []
    if spec.tuning is not None:
        candidates.append(spec.tuning.objective.metric)
    candidates += [g.metric for g in spec.evaluation.gates]
    candidates += ["f1", "accuracy", "r2", "mse"]
    for name in candidates:
        if name in metrics:
            return f"{name}={metrics[name]:.4g}"
    return ""


def _gate_summary(evaluation: dict[str, Any]) -> str:
    """The evaluate step's one-line summary, e.g. ``f1=0.97>=0.9 ✓ recall=0.6>=0.7 ✗``."""
    summary = evaluation.get("gateSummary")
    if summary:
        return str(summary)
    texts = [str(g.get("text", "")) for g in evaluation.get("gates") or []]
    return " ".join(t for t in texts if t) or "no gates"


def _failed_run_message(steps: dict[str, dict[str, Any]], run: RunView) -> tuple[str, str]:
    """(reason, message) of a failed run: a permanent step error names the spec field."""
    failed = [r for r in steps.values() if r.get("state") == "Failed"]
    record = next((r for r in failed if r.get("permanent")), failed[0] if failed else None)
    step = str((record or {}).get("step") or run.failed_step or "unknown")
    if record is not None and record.get("permanent"):
        field_path = record.get("field") or ""
        where = f"spec.{field_path}: " if field_path else ""
        return reasons.INVALID_INPUT, f"step {step} failed: {where}{record.get('message', '')}"
    detail = (record or {}).get("message") or run.message or "failed"
    tail = run.log_tail.strip()[-1500:]
    tries = int((record or {}).get("tries", 1) or 1)
    after = f" after {tries} tries" if tries > 1 else ""
    message = f"step {step} failed{after}: {detail}"
    if tail:
        message += f"\nlog tail:\n{tail}"
    return reasons.STEP_FAILED, message


def executor_error(
    status: TrainingRunStatus, *, generation: int, now: dt.datetime, message: str, temporary: bool
) -> tuple[TrainingRunStatus, list[tuple[str, str, str]]]:
    """The status after the executor failed us: unavailable (temporary) keeps the phase and
    says so in Ready; refused (permanent) fails the attempt, naming what the executor said."""
    status = status.model_copy(deep=True)
    obs = Observed(generation=generation, now=now)
    if temporary:
        text = f"executor unavailable, retrying: {message}"
        _ready(status, obs, "False", reasons.EXECUTOR_UNAVAILABLE, text)
        return status, []
    text = f"the executor refused attempt {status.attempt}: {message}"
    return status, _fail(status, obs, reasons.EXECUTOR_REJECTED, text)


def plan_training(spec: TrainingRunSpec, status: TrainingRunStatus, obs: Observed) -> Decision:
    """The next status of the run and the actions that get it there."""
    status = status.model_copy(deep=True)
    events: list[tuple[str, str, str]] = []
    why = needs_new_attempt(spec, status, obs)
    cancel = ""
    if why:
        scheduled = why.startswith("schedule")
        status, cancel, events = _start_attempt(status, obs, why, scheduled=scheduled)
        _ready(status, obs, "False", reasons.PENDING, f"attempt {status.attempt} pending")
        for type_ in ("GatesPassed", "Degraded"):
            _condition(
                status,
                obs,
                type_=type_,
                value="Unknown",
                reason=reasons.PENDING,
                message="not evaluated yet",
            )
    else:
        status.observed_generation = obs.generation  # e.g. only spec.suspend changed
    decision = Decision(
        status, cancel_run_id=cancel, cancel_attempt=status.attempt - 1, events=events
    )

    if obs.compile_error and status.phase in ACTIVE:
        decision.events += _fail(status, obs, obs.compile_reason, obs.compile_error)
    elif status.phase in NOT_SUBMITTED and awaiting_approval(spec, obs.approved):
        _plan_suspended(status, obs, decision)
    elif status.phase in NOT_SUBMITTED:
        if status.phase == "Suspended":
            _plan_approved(status, obs, decision)
        _plan_admission(spec, status, obs, decision)
    elif status.phase == "Running":
        _plan_running(spec, status, obs, decision)

    if status.phase in TERMINAL:
        decision.requeue_after = IDLE_S
        if spec.schedule:
            due = next_scheduled(spec.schedule, status)
            if due is not None:
                decision.requeue_after = max(1.0, min(IDLE_S, (due - obs.now).total_seconds()))
    return decision


def _plan_suspended(status: TrainingRunStatus, obs: Observed, decision: Decision) -> None:
    """Hold the attempt: nothing is submitted until approval (looked for every poll)."""
    message = (
        f"attempt {status.attempt} is suspended (spec.suspend=true) until approved: run "
        f"{approve_command(obs)}"
    )
    if status.phase != "Suspended":
        decision.events.append(("Normal", reasons.SUSPENDED, message))
    status.phase = "Suspended"
    _condition(
        status,
        obs,
        type_="Progressing",
        value="False",
        reason=reasons.AWAITING_APPROVAL,
        message=message,
    )
    _ready(status, obs, "False", reasons.SUSPENDED, message)
    decision.requeue_after = POLL_RUNNING_S


def _plan_approved(status: TrainingRunStatus, obs: Observed, decision: Decision) -> None:
    """Leaving Suspended: by the annotation (an Approved Event) or spec.suspend=false."""
    if obs.approved:
        message = f"attempt {status.attempt} approved ({APPROVE_ANNOTATION}=true)"
        decision.events.append(("Normal", reasons.APPROVED, message))
    else:
        message = f"attempt {status.attempt} no longer suspended (spec.suspend=false)"
    _condition(
        status, obs, type_="Progressing", value="True", reason=reasons.APPROVED, message=message
    )
    status.phase = "Pending"


def _plan_admission(
    spec: TrainingRunSpec, status: TrainingRunStatus, obs: Observed, decision: Decision
) -> None:
    verdict, message = _gpu_check(spec, obs)
    if verdict == "impossible":
        decision.events += _fail(status, obs, reasons.GPU_REQUEST_IMPOSSIBLE, message)
        return
    if verdict == "queued":
        if status.phase != "Queued":
            decision.events.append(("Normal", reasons.QUEUED, message))
        status.phase = "Queued"
        _ready(status, obs, "False", reasons.QUEUED, message)
        decision.requeue_after = POLL_QUEUED_S
        return
    status.phase = "Running"
    status.spec_hash = obs.spec_hash
    decision.submit = True
    message = f"attempt {status.attempt} submitted (pipeline {obs.spec_hash[:12]})"
    _ready(status, obs, "False", reasons.RUNNING, message)
    decision.events.append(("Normal", reasons.SUBMITTED, message))


def timeout_seconds(spec: TrainingRunSpec) -> float:
    """``spec.timeout`` (``90s``, ``30m``, ``2h``) in seconds."""
    return seconds(spec.timeout)


def _overdue(spec: TrainingRunSpec, status: TrainingRunStatus, now: dt.datetime) -> str:
    """Why the attempt ran past ``spec.timeout`` ('' while within it)."""
    started = parse_rfc3339(status.started_at)
    if started is None:
        return ""
    limit = dt.timedelta(seconds=timeout_seconds(spec))
    if now - started <= limit:
        return ""
    return (
        f"attempt {status.attempt} ran longer than spec.timeout={spec.timeout} "
        f"(step {status.current_step or 'unknown'}); the run was stopped"
    )


def _plan_running(
    spec: TrainingRunSpec, status: TrainingRunStatus, obs: Observed, decision: Decision
) -> None:
    before = status.current_step
    message = _progress(status, obs.steps)
    status.artifacts = dict(list(obs.artifacts.items())[:32])
    if status.current_step and status.current_step != before:
        decision.events.append(("Normal", reasons.STEP_STARTED, f"step {status.current_step}"))
    retried = [
        r
        for r in obs.steps.values()
        if int(r.get("tries", 1)) > 1 or (r.get("state") == "Failed" and not r.get("permanent"))
    ]
    if retried:
        names = ", ".join(sorted(str(r.get("step")) for r in retried))
        _condition(
            status,
            obs,
            type_="Degraded",
            value="True",
            reason=reasons.STEP_RETRYING,
            message=f"retried: {names}",
        )
    run = obs.run
    overdue = _overdue(spec, status, obs.now)
    if overdue and (run is None or run.state in ("Pending", "Running")):
        decision.cancel_run_id, decision.cancel_attempt = status.run_id, status.attempt
        decision.events += _fail(status, obs, reasons.TIMED_OUT, overdue)
        return
    if run is None or run.state in ("Pending", "Running"):
        step = status.current_step or "starting"
        detail = f"step {step}" + (f": {message}" if message else "")
        if status.trials.total:
            detail += f" (trial {status.trials.progress})"
        _ready(status, obs, "False", reasons.RUNNING, detail)
        return
    if run.state == "Unknown":
        # The executor lost the run (e.g. its state was wiped): submit the same attempt again;
        # executors are idempotent per attempt, so a run that still exists is re-attached.
        decision.submit = True
        return
    if run.state == "Failed":
        reason, text = _failed_run_message(obs.steps, run)
        if obs.evaluation is not None and not obs.evaluation.get("gatesPassed", False):
            reason, text = reasons.GATES_FAILED, _gate_summary(obs.evaluation)
        decision.events += _fail(status, obs, reason, text)
        return
    _plan_succeeded(spec, status, obs, decision)


def _plan_succeeded(
    spec: TrainingRunSpec, status: TrainingRunStatus, obs: Observed, decision: Decision
) -> None:
    """The pipeline finished: the evaluation decides; register only when every gate passed."""
    evaluation = obs.evaluation or {}
    status.metrics = {
        str(k): float(v)
        for k, v in (evaluation.get("metrics") or {}).items()
        if isinstance(v, int | float)
    }
    status.best_metric = _best_metric(spec, status.metrics)
    if not evaluation:
        decision.events += _fail(
            status, obs, reasons.STEP_FAILED, "step evaluate left no evaluation.json"
        )
        return
    summary = _gate_summary(evaluation)
    if not evaluation.get("gatesPassed", False):
        _condition(
            status,
            obs,
            type_="GatesPassed",
            value="False",
            reason=reasons.GATES_FAILED,
            message=summary,
        )
        status.current_step = "evaluate"
        decision.events += _fail(
            status, obs, reasons.GATES_FAILED, f"not registered: gates failed: {summary}"
        )
        return
    _condition(
        status, obs, type_="GatesPassed", value="True", reason=reasons.GATES_PASSED, message=summary
    )
    if not obs.manifest:
        decision.events += _fail(
            status, obs, reasons.STEP_FAILED, "step register left no ModelVersion manifest"
        )
        return
    if not obs.registered:
        decision.register = True
        status.current_step = "register"
        return
    status.model_version = obs.registered
    status.phase = "Succeeded"
    status.current_step = ""
    status.completed_at = rfc3339(obs.now)
    if not any(r.get("state") == "Failed" for r in obs.steps.values()):
        _condition(
            status,
            obs,
            type_="Degraded",
            value="False",
            reason=reasons.SUCCEEDED,
            message="no step failed",
        )
    text = f"registered ModelVersion {obs.registered} ({status.best_metric or 'no metrics'})"
    _ready(status, obs, "True", reasons.REGISTERED, text)
    decision.events.append(("Normal", reasons.REGISTERED, text))
