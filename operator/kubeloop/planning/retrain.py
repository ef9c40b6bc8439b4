"""A DriftPolicy's retrain: the TrainingRun it creates and what became of it. Pure.

The retrain is the template's spec with the window's served labelled rows as (or added to) its
data, the followed alias as its registration alias, the served version as its parent, suspended
when approval is manual; labelled, owned and annotated with the evidence. Its outcome follows
the run, then its version's rollout in the target deployment.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from kubeloop import GROUP, VERSION
from kubeloop.api.drift_policy import DriftPolicy, DriftPolicyStatus
from kubeloop.contract.durations import parse_rfc3339, rfc3339, seconds
from kubeloop.contract.labels import (
    DRIFT_EVIDENCE_ANNOTATION,
    DRIFT_POLICY_LABEL,
    RETRAIN_REASON_ANNOTATION,
)
from kubeloop.planning.drift_signals import Result

_ROLLOUT_OUTCOME: Final = {
    "Promoted": "Promoted",
    "RolledBack": "RolledBack",
    "Aborted": "RolledBack",
    "Superseded": "RolledBack",
}


@dataclass(frozen=True)
class Child:
    """A TrainingRun carrying this policy's label."""

    name: str
    phase: str
    model_version: str = ""
    gates_failed: bool = False
    message: str = ""


@dataclass(frozen=True)
class Served:
    """The target deployment as the policy needs it."""

    stable: str | None
    rollouts: Mapping[str, str] = field(default_factory=dict)  # to-version → last result
    followed_alias: str | None = None
    request_log_uri: str = ""


def child_name(policy: str, n: int) -> str:
    suffix = f"-retrain-{n}"
    return policy[: 63 - len(suffix)].rstrip("-") + suffix


def outcome_of(child: Child | None, served: Served) -> tuple[str, str]:
    if child is None:
        return "Failed", " (the TrainingRun is gone)"
    if child.phase == "Suspended":
        return "AwaitingApproval", ""
    if child.phase == "Failed":
        if child.gates_failed:
            return "GatesFailed", f" (not registered, never deployed: {child.message})"[:200]
        return "Failed", f" ({child.message})"[:200] if child.message else ""
    if child.phase != "Succeeded" or not child.model_version:
        return "Training", ""
    result = served.rollouts.get(child.model_version)
    if result in _ROLLOUT_OUTCOME:
        return _ROLLOUT_OUTCOME[result], f" ({child.model_version}: {result})"
    if served.stable == child.model_version:
        return "Promoted", f" ({child.model_version} is stable)"
    return "RollingOut", ""


def served_since(policy: DriftPolicy, status: DriftPolicyStatus, now: dt.datetime) -> dt.datetime:
    """Where the served rows of a retrain begin, at most ``window`` back: at the first breaching
    evaluation when at least an interval of rows has been served since (``for`` >= interval);
    acting sooner, one interval before it, where the rows that first breached are. Rows from
    before the breach mix the old distribution in: measured in the demo, the ~2 % of pre-shift
    rows that "one interval earlier" lets in put the retrained version's own stream at its
    drift threshold right after promotion."""
    start = now - dt.timedelta(seconds=seconds(policy.spec.window))
    began = parse_rfc3339(status.breaching_since)
    if began is None:
        return start
    interval = dt.timedelta(seconds=seconds(policy.spec.interval))
    return max(start, began if now - began >= interval else began - interval)


def retrain_body(
    policy: DriftPolicy,
    template: Mapping[str, Any],
    served: Served,
    status: DriftPolicyStatus,
    results: Sequence[Result],
    *,
    name: str,
    now: dt.datetime,
) -> dict[str, Any]:
    """The TrainingRun a retrain creates: the template's spec, with the window's served
    labelled rows as (or added to) its data, the followed alias as its registration alias,
    the served version as its parent, suspended when approval is manual; labelled, owned and
    annotated with the evidence."""
    action = policy.spec.action
    spec = json.loads(json.dumps(dict(template)))  # a deep copy of plain JSON
    spec.pop("schedule", None)
    start = served_since(policy, status, now)
    served_rows = {
        "uri": served.request_log_uri,
        "format": "requestLog",
        "since": rfc3339(start),
    }
    data = dict(spec.get("data") or {})
    if action.data == "served":
        data = {
            key: value
            for key, value in data.items()
            if key in ("target", "task", "features", "split")
        } | served_rows
    elif action.data == "both":
        data["extra"] = [*(data.get("extra") or []), served_rows][-4:]
    spec["data"] = data
    registration = dict(spec.get("registration") or {})
    if served.followed_alias:
        registration["alias"] = served.followed_alias
    if status.baseline_version:
        registration["parentVersion"] = status.baseline_version
    spec["registration"] = registration
    # A template may itself be suspended (a recipe that never runs on its own): the retrain
    # waits only when the policy asks for approval.
    spec["suspend"] = action.approval == "manual"
    breaching = [r for r in results if r.outcome == "Breach"]
    evidence = {
        "policy": policy.name,
        "baselineVersion": status.baseline_version,
        "window": policy.spec.window,
        "windowStart": rfc3339(start),
        "windowEnd": rfc3339(now),
        "breachingSince": status.breaching_since,
        "for": policy.spec.for_,
        "data": action.data,
        "signals": [
            {
                "name": r.name,
                "type": r.type,
                "value": r.value,
                "threshold": r.threshold,
                "count": r.count,
                "feature": r.feature,
                "outcome": r.outcome,
            }
            for r in results
        ],
        "topFeatures": [s.model_dump(mode="json") for s in status.top_features],
    }
    reason = (
        f"drift on {status.baseline_version or 'the served version'}: "
        + "; ".join(
            f"{r.name} {r.score_text()} {'<' if r.below else '>'} {r.threshold:.3g} "
            f"(n={r.count or 0:.0f})"
            for r in breaching
            if r.threshold is not None
        )
        + f", over {policy.spec.window} for {policy.spec.for_}"
    )
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {
            "name": name,
            "namespace": policy.namespace,
            "labels": {DRIFT_POLICY_LABEL: policy.name},
            "annotations": {
                DRIFT_EVIDENCE_ANNOTATION: json.dumps(evidence, separators=(",", ":")),
                RETRAIN_REASON_ANNOTATION: reason[:1000],
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "DriftPolicy",
                    "name": policy.name,
                    "uid": policy.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": spec,
    }
