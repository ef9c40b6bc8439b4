"""The chaos suite, shortened: the code path of ``make chaos`` (bench/chaos.py, hack/chaos/) with
smaller numbers, on a control plane of its own (its API server and etcd are restarted, which the
session's cluster must not see), with its own Prometheus, fault proxy and namespace.

One run (about three minutes on two cores): ~150 ModelVersions in waves, a TrainingRun and one
with bad input, a canary with real traffic (a broken version rolled back, then a good one
promoted while Prometheus is stopped during one step and the canary's model server is SIGKILLed
during another), a DriftPolicy watching it; the operator SIGKILLed 5 times at seeded moments
(and once more during deletion), the API server restarted once, 5 % of the operator's writes
answered 409 (and, on purpose, one ModelVersion's first status write, one deleted object's
finalizer removal — kopf's own patches, which kopf alone would not retry, see
``handlers/kopf_patching.py``), the watches silent for 8 s while a wave lands. Each test below
asserts one invariant of that run; the last ones show that each invariant counts what it
forbids.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from hack.chaos import invariants as inv
from hack.chaos.record import AnalysisSeen, Processes, classify_process
from hack.chaos.scenario import counts, run_chaos, save
from hack.chaos.world import short_config
from hack.cluster import cluster as cluster_mod

SEED = 7


@pytest.fixture(scope="module")
async def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # Beside the session's control plane (never the same directory: both are purged).
    session = Path(os.environ.get("KUBELOOP_TEST_CLUSTER_DIR", cluster_mod.CACHE / "cluster-test"))
    work = tmp_path_factory.mktemp("chaos")
    cfg = short_config(work, session.with_name(session.name + "-chaos"), seed=SEED)
    found = await run_chaos(cfg)
    save(found, work / "chaos.json")
    print(f"\n{found['result']}\nreport: {work / 'chaos.json'}")
    return found


def _observed(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [o for o in report["observed"] if o["kind"] == kind]


# --- the invariants of the run ------------------------------------------------------------------


def test_every_object_converges(report: dict[str, Any]) -> None:
    c = counts(report)
    assert report["workload_errors"] == []
    assert (report["lost"], report["wrong"]) == ([], [])
    assert c["converged"] == c["objects"]


def test_the_writes_refused_on_purpose_were_refused_and_healed(report: dict[str, Any]) -> None:
    """kopf's own patches (a version's first status write, and usually a deployment's finalizer
    removal) were answered 409 once; the invariants above and below (converged, no stuck
    finalizer) show each was retried, not lost. (The policy's retrain create is refused in the
    full run, ``make chaos``, whose drift world retrains; test_drift_retrain_create.py.)"""
    refused = report["proxy"]["refused"]
    assert any("/modelversions/probe-v1/status" in r for r in refused), refused
    # The finalizer probe is armed before the deletions but lands only if the operator that
    # removes the finalizer is the one behind the proxy at that moment (a kill during deletion
    # can race it); when it lands, no_finalizer below shows it was retried.


def test_no_duplicate_children(report: dict[str, Any]) -> None:
    dup = report["duplicates"]
    assert dup == {
        "versions_per_attempt": {},
        "runner_starts_per_attempt": {},
        "instances_at_once": {},
        "retrains_per_breach": {},
        "phantom_retrains": {},
    }
    assert report["alias_holders"] == {}  # one holder per alias per model
    assert counts(report)["duplicates"] == 0


def test_no_traffic_to_a_canary_after_its_rollback(report: dict[str, Any]) -> None:
    traffic = report["traffic_after_rollback"]
    assert list(traffic) == ["churn-0/churn-v3"]
    seen = traffic["churn-0/churn-v3"]
    assert seen["requests_before"] > 0  # it was served (the check sees real traffic) ...
    assert (seen["requests_after"], seen["weights_after"]) == (0, 0)  # ... and never again


def test_no_canary_promoted_while_its_metrics_were_missing(report: dict[str, Any]) -> None:
    assert report["promoted_without_data"] == []
    assert report["passes_during_outages"] == []
    # The outage fell on a canary step: the analysis held (Inconclusive), then promoted.
    verdicts = report["verdicts_during_outages"]
    assert verdicts.get("Inconclusive", 0) >= 4, verdicts  # a held analysis: its four checks
    assert "Pass" not in verdicts
    history = report["statuses"]["ModelDeployment/churn-0"]["history"]
    assert [(h["toVersion"], h["result"]) for h in history] == [
        ("churn-v3", "RolledBack"),
        ("churn-v2", "Promoted"),
    ]


def test_deletion_leaves_no_finalizer_and_the_namespace_goes(report: dict[str, Any]) -> None:
    deletion = report["deletion"]
    assert deletion["stuck_finalizers"] == []
    assert deletion["namespace_deleted"], deletion["left_in_namespace"]


def test_deletion_stops_every_process(report: dict[str, Any]) -> None:
    assert report["leaked_processes"] == []


def test_every_fault_happened_and_was_seen(report: dict[str, Any]) -> None:
    """Each fault became a condition or an Event with a reason, or healed; none crash-looped."""
    c = counts(report)
    assert c["kills"] >= 6  # 5 in the fault window, 1 during deletion
    assert report["operator"]["crashes"] == []  # no exit we did not cause
    (restart,) = _observed(report, "kube-apiserver")
    assert restart["end"] > restart["start"]
    proxy = report["proxy"]
    assert proxy["conflicts_injected"] > 20
    assert proxy["withheld_events"] > 0
    assert proxy["cut_streams"] > 0
    (outage,) = _observed(report, "prometheus")
    assert "DriftPolicy Ready=PrometheusUnavailable(False)" in outage["conditions"], outage
    assert "Warning PrometheusUnavailable" in outage["events"], outage
    (server,) = _observed(report, "model-server")
    assert "ModelDeployment Degraded=ServingFailed(True)" in server["conditions"], server


def test_a_wave_created_while_the_watch_is_silent_waits_then_converges(
    report: dict[str, Any],
) -> None:
    silence = report["silence"]
    assert silence["versions"] > 20
    assert silence["kills_during_silence"] == 0
    assert silence["reconciled_during_silence"] == 0  # the watch really was silent
    assert silence["never_reconciled"] <= silence["versions"] // 10  # deleted ones


# --- every invariant counts what it forbids ------------------------------------------------------


def _mv(name: str, run: str = "", attempt: int = 1, **status: Any) -> dict[str, Any]:
    labels = {"kubeloop.dev/training-run": run, "kubeloop.dev/attempt": str(attempt)} if run else {}
    return {
        "kind": "ModelVersion",
        "metadata": {"name": name, "generation": 1, "labels": labels},
        "spec": {"modelName": name.rsplit("-", 1)[0]},
        "status": status,
    }


def test_a_duplicated_child_is_counted() -> None:
    once = [_mv("cancer-v1", "tr-0"), _mv("cancer-v2", "tr-0", attempt=2)]
    assert inv.duplicate_registrations(once) == {}
    twice = [*once, _mv("cancer-v3", "tr-0")]  # attempt 1 registered a second version
    assert inv.duplicate_registrations(twice) == {"tr-0/1": ["cancer-v1", "cancer-v3"]}
    assert inv.duplicate_runner_starts({"a/attempt-1": 1, "b/attempt-1": 2}) == {"b/attempt-1": 2}
    servers = {("server", "churn-0/churn-v2"): Processes({1, 2}, 2), ("router", "x"): Processes()}
    assert inv.duplicate_instances(servers) == {"server churn-0/churn-v2": 2}
    runs = [{"metadata": {"labels": {"kubeloop.dev/drift-policy": "p"}}}] * 2
    policies = [{"metadata": {"name": "p"}, "status": {"retrainCount": 1}}]
    assert inv.duplicate_retrains(runs, policies) == {"p": 1}
    recorded = {"retrains": [{"trainingRun": "p-retrain-1"}, {"trainingRun": "p-retrain-2"}]}
    policies = [{"metadata": {"name": "p"}, "status": recorded}]
    assert inv.phantom_retrains(policies, ["p-retrain-1", "p-retrain-2"]) == {}
    assert inv.phantom_retrains(policies, ["p-retrain-2"]) == {"p": ["p-retrain-1"]}


def test_a_lost_or_unsettled_object_is_counted() -> None:
    want = [inv.Expected("ModelVersion", n, True) for n in ("ok", "gone", "none", "old")]
    ready = [{"type": "Ready", "status": "True", "reason": "Registered"}]
    bodies: dict[tuple[str, str], Any] = {
        ("ModelVersion", "ok"): _mv("ok", observedGeneration=1, conditions=ready),
        ("ModelVersion", "none"): _mv("none"),
        ("ModelVersion", "old"): {
            **_mv("old", observedGeneration=1, conditions=ready),
            "metadata": {"name": "old", "generation": 2},
        },
    }
    result = inv.convergence(want, bodies)
    assert result.converged == 1
    assert result.lost == [
        "ModelVersion/gone: vanished",
        "ModelVersion/none: never reconciled (no status)",
    ]
    assert result.wrong == ["ModelVersion/old: observedGeneration 1 != generation 2"]
    failed = inv.Expected("ModelVersion", "ok", False, "ArtifactDigestMismatch")
    assert inv.judge(failed, bodies[("ModelVersion", "ok")])[0] == "wrong"
    assert inv.judge(inv.Expected("ModelVersion", "ok", None), bodies[("ModelVersion", "ok")]) == (
        "wrong",
        "still present after deletion",
    )


def test_traffic_after_a_rollback_is_counted() -> None:
    rollback = inv.Rollback("churn-0", "churn-v3", at=100.0, port=4321, until=110.0)
    counter = [(90.0, 10.0), (99.0, 30.0), (101.0, 30.0)]
    assert inv.served_after(counter, 100.0) == 0
    assert inv.served_after([*counter, (105.0, 34.0)], 100.0) == 4
    assert inv.served_after([*counter, (105.0, 3.0)], 100.0) == 3  # a restarted server
    weights: list[tuple[float, dict[str, Any]]] = [
        (99.0, {"canary": 4321, "canary_weight": 20}),
        (100.5, {"canary": None, "canary_weight": 0}),
        (111.0, {"canary": 5555, "canary_weight": 20}),  # the next rollout
    ]
    assert inv.weights_after_rollback(rollback, weights) == 0
    weights.append((102.0, {"canary": 4321, "canary_weight": 20}))
    assert inv.weights_after_rollback(rollback, weights) == 1


def test_a_promotion_on_missing_metrics_is_counted() -> None:
    outage = [(1_000.0, 1_100.0)]  # epoch seconds: 1970-01-01T00:16:40Z to 00:18:20Z

    def record(step: int, verdict: str, stamp: str) -> AnalysisSeen:
        return AnalysisSeen("churn-0", "churn-v2", step, "errorRate", verdict, stamp, 0.0)

    held = record(1, "Inconclusive", "1970-01-01T00:17:00Z")
    passed = record(1, "Pass", "1970-01-01T00:17:00Z")
    before = record(0, "Pass", "1970-01-01T00:16:39Z")  # its second ends as the outage begins
    promotion = [("churn-0", "churn-v2", "1970-01-01T00:20:00Z")]
    assert inv.promoted_without_data([held, before], promotion, outage) == []
    assert inv.promoted_without_data([held, passed], promotion, outage) == [
        "churn-0: churn-v2 promoted at 1970-01-01T00:20:00Z"
    ]
    during = [("churn-0", "churn-v2", "1970-01-01T00:17:30Z")]
    assert len(inv.promoted_without_data([], during, outage)) == 1
    assert math.isinf(inv.Rollback("a", "b", 0, 0).until)


def test_a_stuck_finalizer_is_counted() -> None:
    gone_soon = {"kind": "ModelDeployment", "metadata": {"name": "a"}}
    stuck = {
        "kind": "ModelDeployment",
        "metadata": {
            "name": "b",
            "deletionTimestamp": "2026-01-01T00:00:00Z",
            "finalizers": ["kubeloop.dev/finalizer"],
        },
    }
    assert inv.stuck_finalizers([gone_soon, stuck]) == [
        "ModelDeployment/b: ['kubeloop.dev/finalizer']"
    ]


def test_only_the_runs_own_processes_are_counted(tmp_path: Path) -> None:
    roots = {
        "artifact_root": tmp_path / "artifacts",
        "serving_root": tmp_path / "state" / "serving",
        "training_root": tmp_path / "state" / "training",
    }
    mine = ["python", "-m", "kubeloop.serving", "--model-dir", str(tmp_path / "artifacts" / "m")]
    mine += ["--model-name", "churn-0", "--model-version", "churn-v2"]
    theirs = [*mine[:4], "/elsewhere/m", *mine[5:]]
    assert classify_process(mine, **roots) == ("server", "churn-0/churn-v2")
    assert classify_process(theirs, **roots) is None
    runner = ["python", "-m", "kubeloop_pipelines.local_runner", "--state-dir"]
    attempt = str(tmp_path / "state" / "training" / "ns" / "tr-0-1234" / "attempt-1")
    assert classify_process([*runner, attempt], **roots) == ("runner", attempt)
