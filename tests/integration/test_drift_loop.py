"""The closed loop end to end: the real operator (its own process, so it can be SIGKILLed), the
real control plane, real Prometheus scraping real model servers, real training by the local
executor, real labelled traffic (hack/loop.py, the world of hack/demo_data.py).

Asserted stage by stage: a steady stream never retrains; the shift is detected and acted on once
(the operator is killed right after it created the retrain, and again during the canary); the
retrained version wins the canary and the policy re-baselines on it; the new model is better on
post-shift payments it never saw. Then dryRun and manual approval, and bad policies refused
with Ready=False naming the field.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hack import dashboard, demo_data, loop
from hack import prometheus as prometheus_mod

from kubeloop.contract.labels import (
    APPROVE_ANNOTATION,
    DRIFT_EVIDENCE_ANNOTATION,
    RETRAIN_REASON_ANNOTATION,
)
from tests.integration.conftest import LocalCluster, free_port, operator_process


@pytest.fixture
def env(serving_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBELOOP_EXECUTOR", "local")
    return serving_env


class Operator:
    """The operator as a process that a test may kill and start again."""

    def __init__(
        self, namespace: str, artifact_root: Path, log: Path, *, metrics_port: int = 0
    ) -> None:
        self.args = (namespace, artifact_root, log)
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[bytes] = self._start()
        self.kills = 0

    def _start(self) -> subprocess.Popen[bytes]:
        return operator_process(*self.args, metrics_port=self.metrics_port)

    def kill_and_restart(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # no graceful shutdown: mid-work
        self.proc.wait(10)
        self.kills += 1
        self.proc = self._start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def scrape_operator(prom: prometheus_mod.Prom) -> int:
    """A metrics port for the operator, which Prometheus scrapes as the chart's ServiceMonitor
    does (job kubeloop; the tenants' namespace on the drift, rollout and training series kept:
    honor_labels)."""
    port = free_port()
    group = [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": "kubeloop"}}]
    (prom.targets_dir / "kubeloop-operator.json").write_text(json.dumps(group))
    return port


def prom_query(prom: prometheus_mod.Prom, expr: str) -> list[dict[str, Any]]:
    url = f"{prom.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def assert_dashboard_has_data(prom: prometheus_mod.Prom, namespace: str) -> None:
    """Every query of every panel of the chart's Grafana dashboard returns series after the
    loop ran (Grafana's variables resolved as Grafana would: this namespace, 1m, 15m)."""
    queries = [
        (panel.title, dashboard.resolved(q.expr, namespace=namespace, rate="1m", range_="15m"))
        for panel in dashboard.panels()
        for q in panel.queries
    ]

    def empty() -> list[tuple[str, str]]:
        return [(title, expr) for title, expr in queries if not prom_query(prom, expr)]

    deadline = time.monotonic() + 60
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(2)
    assert missing == [], missing


def kubectl(crds: LocalCluster, namespace: str) -> loop.Kubectl:
    return loop.Kubectl(crds.bin_dir / "kubectl", crds.kubeconfig, namespace)


def events(k: loop.Kubectl, name: str) -> list[str]:
    """The reasons of the Events about ``name``, oldest first."""
    return [
        str(e.get("reason"))
        for e in k.items("events")
        if e.get("involvedObject", {}).get("name") == name
    ]


def finished(k: loop.Kubectl, name: str, within: float = 300) -> dict[str, Any]:
    """TrainingRun ``name``'s status once it ended; it must have succeeded."""
    st = finished_any(k, name, within)
    assert st["phase"] == "Succeeded", st
    return st


def assert_steady(k: loop.Kubectl, v1: str) -> None:
    """A stream drawn from the reference: many conclusive evaluations, no breach, no retrain."""

    def evaluated() -> dict[str, Any] | None:
        st = k.status("dp", loop.POLICY)
        conclusive = [h for h in st.get("history", []) if h["outcome"] != "Inconclusive"]
        return st if len(conclusive) >= 6 else None

    steady = loop.wait(evaluated, within=120, what="six conclusive evaluations")
    assert "Breach" not in {h["outcome"] for h in steady["history"]}, steady["history"]
    assert steady["phase"] == "Watching", steady
    assert steady["baselineVersion"] == v1
    outcomes = {s["name"]: s["outcome"] for s in steady["signals"]}
    assert outcomes == {"features": "Pass", "prediction": "Pass", "accuracy": "Pass"}, steady
    assert loop.retrain_runs(k) == []


def assert_evidence(run: dict[str, Any], v1: str) -> None:
    """The retrain says why it exists, on itself."""
    meta = run["metadata"]
    assert meta["labels"]["kubeloop.dev/drift-policy"] == loop.POLICY
    assert meta["ownerReferences"][0]["kind"] == "DriftPolicy"
    evidence = json.loads(meta["annotations"][DRIFT_EVIDENCE_ANNOTATION])
    assert evidence["baselineVersion"] == v1
    breached = {s["name"] for s in evidence["signals"] if s["outcome"] == "Breach"}
    assert "features" in breached, evidence
    assert evidence["topFeatures"][0]["feature"] in demo_data.SHIFTED, evidence
    assert "drift on" in meta["annotations"][RETRAIN_REASON_ANNOTATION]
    data = run["spec"]["data"]
    assert data["format"] == "requestLog"
    assert data["since"] >= evidence["windowStart"]
    assert run["spec"]["registration"]["parentVersion"] == v1


def assert_rebaselined(k: loop.Kubectl, v2: str) -> dict[str, Any]:
    """The policy followed the promotion, and judges the new version's stream against its own
    reference: the drift just answered (PSI 0.2 to 1.5 against thresholds near 0.02) is gone."""
    policy: dict[str, Any] = loop.wait(
        lambda: (
            (p := k.status("dp", loop.POLICY)).get("baselineVersion") == v2
            and p.get("retrains", [{}])[0].get("outcome") == "Promoted"
            and p
        ),
        within=60,
        what="the policy to follow the promotion",
    )

    def rebased_features() -> dict[str, Any] | None:
        signals = k.status("dp", loop.POLICY).get("signals", [])
        return next(
            (x for x in signals if x["name"] == "features" and x["outcome"] != "Inconclusive"),
            None,
        )

    rebased = loop.wait(
        rebased_features, within=60, what="a conclusive evaluation against the new reference"
    )
    assert rebased["value"] < 3 * rebased["threshold"], rebased
    return policy


async def test_the_loop_retrains_once_and_canaries_the_better_model(
    crds: LocalCluster,
    namespace: str,
    artifact_root: Path,
    env: Path,
    prometheus: prometheus_mod.Prom,
    tmp_path: Path,
) -> None:
    k = kubectl(crds, namespace)
    docs = loop.manifests(loop.write_training_data(artifact_root, namespace))
    port = scrape_operator(prometheus)
    op = Operator(namespace, artifact_root, tmp_path / "operator.log", metrics_port=port)
    traffic: loop.Traffic | None = None
    try:
        k.apply(docs["training"])
        v1 = finished(k, loop.MODEL)["modelVersion"]
        k.apply(docs["deployment"])
        served = loop.wait(lambda: loop.serving(k, v1), within=120, what=f"{v1} serving")
        traffic = loop.Traffic(served["url"])
        traffic.start()
        k.apply(docs["policy"])
        assert_steady(k, v1)

        # The shift: detected, held for `for`, acted on once.
        traffic.regime = "after"
        shifted = time.monotonic()
        loop.wait(
            lambda: k.status("dp", loop.POLICY).get("breachingSince"),
            within=60,
            what="the first breach",
        )
        op.kill_and_restart()  # while the breach is held for `for`
        acted = loop.wait(lambda: loop.retrains(k), within=120, what="a retrain")
        detect_s = time.monotonic() - shifted
        op.kill_and_restart()  # right after the retrain was created
        run_name = acted[0]["trainingRun"]
        assert run_name == f"{loop.POLICY}-retrain-1"
        assert_evidence(k.get("tr", run_name) or {}, v1)

        v2 = finished(k, run_name)["modelVersion"]
        loop.wait(
            lambda: k.status("md", loop.MODEL).get("canary", {}).get("modelVersion") == v2,
            within=60,
            what=f"{v2} canaried",
        )
        op.kill_and_restart()  # during the canary
        loop.wait(lambda: loop.serving(k, v2), within=240, what=f"{v2} promoted")
        policy = assert_rebaselined(k, v2)
        assert_dashboard_has_data(prometheus, namespace)
    finally:
        if traffic is not None:
            traffic.stopped.set()
        op.stop()
        (prometheus.targets_dir / "kubeloop-operator.json").unlink(missing_ok=True)
    # Exactly one retrain, despite three kills of the operator mid-loop.
    assert [r["metadata"]["name"] for r in loop.retrain_runs(k)] == [run_name]
    assert policy["retrainCount"] == 1
    assert policy["retrains"][0]["modelVersion"] == v2
    reasons = events(k, loop.POLICY)
    # Events are best effort: the kill right after the retrain was created may take its
    # RetrainStarted Event with it (kopf posts them in the background), never a second one.
    assert reasons.count("RetrainStarted") <= 1, reasons
    assert {"Rebaselined", "RetrainFinished"} <= set(reasons), reasons
    history = k.status("md", loop.MODEL)["history"]
    assert [(h["toVersion"], h["result"]) for h in history] == [(v2, "Promoted")]
    # Every label fed back reached the version that answered it (the router remembers which):
    # none was "unknown" (404) to the server it reached.
    assert traffic.feedback["200"] > 0.99 * traffic.feedback.total(), traffic.feedback
    assert traffic.feedback["404"] == 0, traffic.feedback
    # Better on post-shift payments it never saw.
    held_out = demo_data.generate("after", 1500, seed=123)
    old, new = (
        demo_data.evaluate((k.get("mv", v) or {})["spec"]["artifact"]["uri"], held_out)
        for v in (v1, v2)
    )
    assert new["accuracy"] > old["accuracy"] + 0.1, (old, new)
    print(f"detect {detect_s:.1f}s; accuracy {old['accuracy']:.3f} -> {new['accuracy']:.3f}")


def register_trained(
    k: loop.Kubectl, namespace: str, artifact_root: Path, trained: dict[str, Any]
) -> str:
    """A ModelVersion of an already trained ``payments`` model, its artifact under the tenant."""
    source = Path(trained["spec"]["artifact"]["uri"].removeprefix("file://"))
    target = artifact_root / namespace / "payments" / "v1"
    shutil.copytree(source, target, dirs_exist_ok=True)
    spec = json.loads(json.dumps(trained["spec"]))
    spec["artifact"]["uri"] = f"file://{target}"
    spec |= {"modelName": loop.MODEL, "version": 1, "aliases": [loop.ALIAS]}
    spec.pop("lineage", None)
    k.apply(
        {
            "apiVersion": loop.API,
            "kind": "ModelVersion",
            "metadata": {"name": "payments-v1"},
            "spec": spec,
        }
    )
    return "payments-v1"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``payments`` model trained by the local executor (no API server), its ModelVersion
    manifest as the register step wrote it."""
    root = tmp_path_factory.mktemp("trained")
    data = demo_data.write_training_csv(root / "before.csv", loop.TRAIN_ROWS, seed=1)
    result = asyncio.run(demo_data.train_locally(root, "payments", f"file://{data}"))
    manifest = Path(result.model_uri.removeprefix("file://")).parent / "modelversion.json"
    return dict(json.loads(manifest.read_text()))


def world_without_training(
    k: loop.Kubectl,
    namespace: str,
    artifact_root: Path,
    trained: dict[str, Any],
    gates: list[dict[str, Any]] | None = None,
    **policy: Any,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The served ``payments`` model from ``trained`` and a template TrainingRun that never
    runs on its own (suspended, never approved): the policy's recipe for a retrain."""
    v1 = register_trained(k, namespace, artifact_root, trained)
    docs = loop.manifests(loop.write_training_data(artifact_root, namespace), **policy)
    template = json.loads(json.dumps(docs["training"]))
    template["spec"]["suspend"] = True
    if gates is not None:
        template["spec"]["evaluation"]["gates"] = gates
    k.apply(template)
    docs["policy"]["spec"]["action"]["template"] = {"name": loop.MODEL}
    k.apply(docs["deployment"])
    return v1, docs


async def test_dry_run_renders_and_manual_approval_waits_for_the_annotation(
    crds: LocalCluster,
    namespace: str,
    artifact_root: Path,
    env: Path,
    tmp_path: Path,
    trained: dict[str, Any],
) -> None:
    k = kubectl(crds, namespace)
    v1, docs = world_without_training(k, namespace, artifact_root, trained, hold="0s", dry_run=True)
    op = Operator(namespace, artifact_root, tmp_path / "operator.log")
    served = loop.wait(lambda: loop.serving(k, v1), within=120, what=f"{v1} serving")
    traffic = loop.Traffic(served["url"])
    traffic.regime = "after"  # drifted from the start
    traffic.start()
    try:
        k.apply(docs["policy"])
        rendered = loop.wait(
            lambda: k.status("dp", loop.POLICY).get("dryRunTrainingRun"),
            within=90,
            what="a dry-run rendering",
        )
        body = json.loads(rendered)
        assert body["metadata"]["name"] == f"{loop.POLICY}-retrain-1"
        assert body["spec"]["data"]["format"] == "requestLog"
        assert body["spec"]["suspend"] is False  # the template's own suspend is not copied
        await asyncio.sleep(6)  # more breaching evaluations: still nothing created
        assert loop.retrain_runs(k) == []
        assert "DryRun" in events(k, loop.POLICY)

        docs["policy"]["spec"]["action"] |= {"dryRun": False, "approval": "manual"}
        k.apply(docs["policy"])
        run = loop.wait(lambda: loop.retrain_runs(k), within=60, what="the retrain")[0]
        name = run["metadata"]["name"]
        assert run["spec"]["suspend"] is True
        waiting = loop.wait(
            lambda: (s := k.status("tr", name)).get("phase") == "Suspended" and s,
            within=30,
            what="the retrain to wait for approval",
        )
        ready = next(c for c in waiting["conditions"] if c["type"] == "Ready")
        assert "kubeloop.dev/approve=true" in ready["message"], ready
        policy = loop.wait(
            lambda: (p := k.status("dp", loop.POLICY)).get("phase") == "AwaitingApproval" and p,
            within=30,
            what="the policy to show it",
        )
        assert policy["retrains"][0]["outcome"] == "AwaitingApproval"
        await asyncio.sleep(3)
        assert k.status("tr", name)["phase"] == "Suspended"  # nothing runs unapproved
        k.run("annotate", "trainingrun", name, f"{APPROVE_ANNOTATION}=true")
        loop.wait(
            lambda: k.status("tr", name).get("phase") in ("Running", "Succeeded"),
            within=60,
            what="the approved retrain to run",
        )
        assert len(loop.retrain_runs(k)) == 1
    finally:
        traffic.stopped.set()
        op.stop()


async def test_bad_policies_are_refused_naming_the_field(
    crds: LocalCluster,
    namespace: str,
    artifact_root: Path,
    env: Path,
    tmp_path: Path,
    trained: dict[str, Any],
) -> None:
    k = kubectl(crds, namespace)
    v1, docs = world_without_training(k, namespace, artifact_root, trained)
    op = Operator(namespace, artifact_root, tmp_path / "operator.log")
    try:
        loop.wait(lambda: loop.serving(k, v1), within=120, what=f"{v1} serving")
        base = docs["policy"]
        # (A threshold that is neither a number nor auto is the API server's to refuse now:
        # tests/integration/test_validation.py.) No webhook here: the daemon refuses.
        cases = {
            "no-target": ({"target": {"name": "nope"}}, "TargetNotFound", "spec.target.name"),
            "feature": (
                {"signals": [{"name": "s", "type": "psi", "feature": "zip", "threshold": 0.2}]},
                "InvalidSpec",
                "spec.signals[0].feature",
            ),
            "promql": (
                {
                    "signals": [
                        {
                            "name": "s",
                            "type": "promql",
                            "query": 'sum(up{namespace="other"})',
                            "threshold": 1,
                        }
                    ]
                },
                "UnsafeQuery",
                "spec.signals[0].query",
            ),
            "regression-only": (
                {"signals": [{"name": "s", "type": "mae", "threshold": 1}]},
                "InvalidSpec",
                "spec.signals[0].type",
            ),
            "no-template": (
                {"action": {"template": {"name": "gone"}}},
                "TemplateNotFound",
                "spec.action.template.name=gone",
            ),
        }
        for name, (spec, _, _) in cases.items():
            doc = json.loads(json.dumps(base))
            doc["metadata"]["name"] = name
            doc["spec"] |= spec
            k.apply(doc)
        for name, (_, reason, field) in cases.items():

            def refused(name: str = name) -> dict[str, Any] | None:
                st = k.status("dp", name)
                ready = next((c for c in st.get("conditions", []) if c["type"] == "Ready"), None)
                return ready if ready and ready["status"] == "False" else None

            ready = loop.wait(refused, within=60, what=f"{name} refused")
            assert ready["reason"] == reason, (name, ready)
            assert field in ready["message"], (name, ready)
        assert loop.retrain_runs(k) == []
    finally:
        op.stop()


async def test_a_retrain_that_fails_its_gates_is_never_deployed_and_cools_down(
    crds: LocalCluster,
    namespace: str,
    artifact_root: Path,
    env: Path,
    tmp_path: Path,
    trained: dict[str, Any],
) -> None:
    k = kubectl(crds, namespace)
    impossible = [{"metric": "accuracy", "op": ">=", "value": 0.999}]
    v1, docs = world_without_training(
        k, namespace, artifact_root, trained, gates=impossible, hold="0s", cooldown="10m"
    )
    op = Operator(namespace, artifact_root, tmp_path / "operator.log")
    served = loop.wait(lambda: loop.serving(k, v1), within=120, what=f"{v1} serving")
    traffic = loop.Traffic(served["url"])
    traffic.regime = "after"
    traffic.start()
    try:
        k.apply(docs["policy"])
        name = loop.wait(lambda: loop.retrain_runs(k), within=90, what="a retrain")[0]
        name = name["metadata"]["name"]
        run = finished_any(k, name)
        assert run["phase"] == "Failed", run
        policy = loop.wait(
            lambda: (
                (p := k.status("dp", loop.POLICY)).get("retrains", [{}])[0].get("outcome")
                == "GatesFailed"
                and p
            ),
            within=60,
            what="the policy to record GatesFailed",
        )
        await asyncio.sleep(10)  # more breaching evaluations inside the cooldown
        policy = k.status("dp", loop.POLICY)
        assert policy["phase"] == "Cooldown", policy
        assert (
            "cooldown" in next(c for c in policy["conditions"] if c["type"] == "Ready")["message"]
        )
        assert len(loop.retrain_runs(k)) == 1
        assert "RetrainFinished" in events(k, loop.POLICY)
        md = k.status("md", loop.MODEL)
        assert md["stable"]["modelVersion"] == v1
        assert md.get("history", []) == []
        assert not md.get("canary", {}).get("modelVersion")
        assert [m["metadata"]["name"] for m in k.items("mv")] == [v1]  # nothing registered
    finally:
        traffic.stopped.set()
        op.stop()


def finished_any(k: loop.Kubectl, name: str, within: float = 300) -> dict[str, Any]:
    st: dict[str, Any] = loop.wait(
        lambda: (s := k.status("tr", name)).get("phase") in ("Succeeded", "Failed") and s,
        within=within,
        what=f"TrainingRun {name} to end",
    )
    return st
