"""The chaos suite's invariants: pure functions over what a run recorded, each counting what it
forbids (so each can be shown to fail on a record that breaks it, see test_chaos.py).

- convergence: every object reaches its declared state (``observedGeneration == generation``,
  Ready or the expected failure, the expected phase and stable version) or, deleted, is gone;
  one that vanished or was never reconciled at all is *lost*;
- no duplicate children: ModelVersions per TrainingRun attempt (labels), local pipeline runs
  per attempt (runner starts in the attempt's log, runner sessions alive at once), model servers
  per deployment version and routers per deployment (sessions alive at once), retraining
  TrainingRuns per breach;
- no traffic to a canary after its rollback (its requests counter in Prometheus, and the
  router's weights file);
- no canary promoted while its metrics were missing (a passing analysis stamped inside a
  Prometheus outage);
- no finalizer left after deletion.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hack.chaos.record import AnalysisSeen, Processes
from kubeloop.contract.labels import ATTEMPT_LABEL, DRIFT_POLICY_LABEL, TRAINING_RUN_LABEL

Body = Mapping[str, Any]


# --- convergence ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What an object must end as. ``ready`` None: it was deleted and must be gone."""

    kind: str
    name: str
    ready: bool | None = True
    reason: str = ""  # Ready's reason, where it must be a particular one
    phase: str = ""
    stable: str = ""  # ModelDeployment: the version it must serve

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.name


def _ready(body: Body) -> Mapping[str, Any] | None:
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Ready"), None)


def judge(expected: Expected, body: Body | None) -> tuple[str, str]:
    """("converged" | "lost" | "wrong", why) for one object."""
    if expected.ready is None:
        return ("converged", "") if body is None else ("wrong", "still present after deletion")
    if body is None:
        return "lost", "vanished"
    status = body.get("status") or {}
    observed, generation = status.get("observedGeneration"), body["metadata"].get("generation")
    if observed is None or not status.get("conditions"):
        return "lost", "never reconciled (no status)"
    if observed != generation:
        return "wrong", f"observedGeneration {observed} != generation {generation}"
    ready = _ready(body)
    want = "True" if expected.ready else "False"
    if ready is None or ready.get("status") != want:
        got = f"{ready.get('status')}/{ready.get('reason')}" if ready else "none"
        return "wrong", f"Ready {got}, expected {want}"
    if expected.reason and ready.get("reason") != expected.reason:
        return "wrong", f"Ready reason {ready.get('reason')}, expected {expected.reason}"
    if expected.phase and status.get("phase") != expected.phase:
        return "wrong", f"phase {status.get('phase')!r}, expected {expected.phase!r}"
    stable = str((status.get("stable") or {}).get("modelVersion") or "")
    if expected.stable and stable != expected.stable:
        return "wrong", f"stable {stable!r}, expected {expected.stable!r}"
    return "converged", ""


@dataclass
class Convergence:
    converged: int = 0
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    @property
    def unsettled(self) -> list[str]:
        return [*self.lost, *self.wrong]


def convergence(
    expected: Iterable[Expected], bodies: Mapping[tuple[str, str], Body]
) -> Convergence:
    result = Convergence()
    for want in expected:
        verdict, why = judge(want, bodies.get(want.key))
        if verdict == "converged":
            result.converged += 1
        else:
            getattr(result, verdict).append(f"{want.kind}/{want.name}: {why}")
    return result


PLURALS = {
    "modelversions": "ModelVersion",
    "trainingruns": "TrainingRun",
    "modeldeployments": "ModelDeployment",
    "driftpolicies": "DriftPolicy",
}


def refused_after(refused: Iterable[tuple[float, str, str]], since: float) -> set[tuple[str, str]]:
    """The objects (kind, name) of which a write was refused with a 409 after ``since``
    (the proxy's log of (t, method, path))."""
    found = set()
    for t, _, path in refused:
        parts = path.strip("/").split("/")
        if t <= since or "namespaces" not in parts:
            continue
        rest = parts[parts.index("namespaces") + 2 :]
        if len(rest) >= 2 and rest[0] in PLURALS:
            found.add((PLURALS[rest[0]], rest[1]))
    return found


def explained(
    unsettled: Iterable[str], victims: set[tuple[str, str]]
) -> tuple[list[str], list[str]]:
    """Split "Kind/name: why" entries into those with a refused write (``victims``) and the
    rest."""
    known: list[str] = []
    other: list[str] = []
    for entry in unsettled:
        kind, name = entry.split(":", 1)[0].split("/", 1)
        (known if (kind, name) in victims else other).append(entry)
    return known, other


# --- duplicate children --------------------------------------------------------------------------


def duplicate_registrations(versions: Iterable[Body]) -> dict[str, list[str]]:
    """TrainingRun attempts that registered more than one ModelVersion: "run/attempt" → names."""
    by_attempt: dict[str, list[str]] = defaultdict(list)
    for mv in versions:
        labels = mv["metadata"].get("labels") or {}
        if TRAINING_RUN_LABEL in labels:
            key = f"{labels[TRAINING_RUN_LABEL]}/{labels.get(ATTEMPT_LABEL, '?')}"
            by_attempt[key].append(mv["metadata"]["name"])
    return {k: sorted(v) for k, v in by_attempt.items() if len(v) > 1}


def duplicate_runner_starts(starts: Mapping[str, int]) -> dict[str, int]:
    """Attempt directories whose pipeline runner started more than once."""
    return {attempt: n for attempt, n in starts.items() if n > 1}


def duplicate_instances(processes: Mapping[tuple[str, str], Processes]) -> dict[str, int]:
    """Servers (per deployment version), routers (per deployment) and runners (per attempt)
    of which more than one instance was alive at once: "role key" → most alive at once."""
    return {
        f"{role} {key}": procs.max_alive
        for (role, key), procs in processes.items()
        if procs.max_alive > 1
    }


def duplicate_retrains(runs: Iterable[Body], policies: Iterable[Body]) -> dict[str, int]:
    """DriftPolicies with more retraining TrainingRuns than breaches acted on (retrainCount)."""
    labelled: dict[str, int] = defaultdict(int)
    for run in runs:
        policy = (run["metadata"].get("labels") or {}).get(DRIFT_POLICY_LABEL)
        if policy:
            labelled[policy] += 1
    extra = {}
    for policy in policies:
        name = policy["metadata"]["name"]
        breaches = int((policy.get("status") or {}).get("retrainCount") or 0)
        if labelled.get(name, 0) > breaches:
            extra[name] = labelled[name] - breaches
    return extra


def phantom_retrains(policies: Iterable[Body], seen: Iterable[str]) -> dict[str, list[str]]:
    """Retrains a policy recorded whose TrainingRun was never seen in the API (``seen``: every
    TrainingRun name the recorder listed): the breach they were for was retrained again."""
    names = set(seen)
    found = {}
    for policy in policies:
        runs = [
            str(r.get("trainingRun"))
            for r in (policy.get("status") or {}).get("retrains") or []
            if r.get("trainingRun") and r.get("trainingRun") not in names
        ]
        if runs:
            found[policy["metadata"]["name"]] = runs
    return found


# --- traffic after a rollback --------------------------------------------------------------------


@dataclass(frozen=True)
class Rollback:
    deployment: str
    version: str
    at: float  # epoch seconds: when its status first showed the rollback
    port: int  # where the rolled-back canary's server listened
    until: float = math.inf  # when the next rollout of the deployment began


def served_after(samples: Sequence[tuple[float, float]], at: float) -> float:
    """Requests a counter counted after ``at`` (samples (t, value), oldest first; a drop is a
    restarted process counting from 0)."""
    before = [v for t, v in samples if t <= at]
    last = before[-1] if before else None
    served = 0.0
    for t, value in samples:
        if t <= at:
            continue
        served += value if last is None or value < last else value - last
        last = value
    return served


def weights_after_rollback(
    rollback: Rollback, weights: Sequence[tuple[float, Mapping[str, Any]]]
) -> int:
    """Router weight files written after the rollback that still send traffic to its canary
    (before the next rollout began, any canary at all)."""
    bad = 0
    for t, w in weights:
        if t <= rollback.at:
            continue
        canary, weight = w.get("canary"), int(w.get("canary_weight") or 0)
        to_it = canary == rollback.port and weight > 0
        if to_it or (t < rollback.until and canary is not None):
            bad += 1
    return bad


# --- promotions without data ---------------------------------------------------------------------


def _stamp(text: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def during_outages(
    analysis: Iterable[AnalysisSeen], outages: Sequence[tuple[float, float]]
) -> list[AnalysisSeen]:
    """Analysis records measured while Prometheus was down. A stamp has one-second
    resolution: a record counts only if its whole second lies inside an outage."""
    found = []
    for record in analysis:
        t = _stamp(record.time)
        if t is not None and any(start <= t and t + 1 <= end for start, end in outages):
            found.append(record)
    return found


def passes_during_outages(
    analysis: Iterable[AnalysisSeen], outages: Sequence[tuple[float, float]]
) -> list[AnalysisSeen]:
    """Passing analysis records measured while Prometheus was down."""
    return [r for r in during_outages(analysis, outages) if r.verdict == "Pass"]


def promoted_without_data(
    analysis: Iterable[AnalysisSeen],
    promotions: Iterable[tuple[str, str, str]],
    outages: Sequence[tuple[float, float]],
) -> list[str]:
    """Promoted rollouts ((deployment, version, finishedAt)) that passed an analysis while
    Prometheus was down, or were promoted while it was."""
    bad_passes = {(r.deployment, r.canary) for r in passes_during_outages(analysis, outages)}
    found = []
    for deployment, version, finished in promotions:
        t = _stamp(finished)
        during = t is not None and any(start <= t and t + 1 <= end for start, end in outages)
        if (deployment, version) in bad_passes or during:
            found.append(f"{deployment}: {version} promoted at {finished}")
    return found


# --- deletion ------------------------------------------------------------------------------------


def stuck_finalizers(bodies: Iterable[Body]) -> list[str]:
    """Objects still present after they were deleted and the deadline passed."""
    return [
        f"{b.get('kind')}/{b['metadata']['name']}: {b['metadata'].get('finalizers')}"
        for b in bodies
        if b["metadata"].get("deletionTimestamp")
    ]
