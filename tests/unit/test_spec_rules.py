"""The rules the webhook refuses at apply and the daemons refuse again at reconcile."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

import pytest

from kubeloop import reasons
from kubeloop.api.drift_policy import DriftPolicySpec
from kubeloop.api.model_deployment import ModelDeploymentSpec
from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.backends.webhook_certs import self_signed
from kubeloop.planning import spec_rules, tenancy, webhook

POLICY = tenancy.Policy("/art")


def tr(**extra: Any) -> TrainingRunSpec:
    body: dict[str, Any] = {
        "data": {"uri": "file:///art/ns/d.csv", "target": "y"},
        "registration": {"modelName": "m"},
    }
    body.update(extra)
    return TrainingRunSpec.model_validate(body)


def md(**rollout: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {"model": {"modelVersion": {"name": "m-v1"}}, "rollout": rollout}
    )


def dp(signals: list[dict[str, Any]], **extra: Any) -> DriftPolicySpec:
    return DriftPolicySpec.model_validate({"target": {"name": "md"}, "signals": signals, **extra})


def test_a_good_training_run_passes() -> None:
    assert spec_rules.training_run(tr(schedule="0 3 * * *"), "ns", POLICY) == []


def test_every_data_source_is_held_to_the_tenant() -> None:
    spec = tr(
        data={
            "uri": "file:///art/other/d.csv",
            "target": "y",
            "extra": [{"uri": "file:///art/ns/ok.csv"}, {"uri": "file:///etc/passwd"}],
        }
    )
    found = spec_rules.training_run(spec, "ns", POLICY)
    assert [r.reason for r in found] == [spec_rules.DATA_OUTSIDE_TENANT] * 2
    assert found[0].message.startswith("spec.data.uri ")
    assert found[1].message.startswith("spec.data.extra[1].uri ")


@pytest.mark.parametrize("schedule", ["61 * * * *", "* * 32 * *", "0 25 * * *", "* * * 13 *"])
def test_a_cron_the_calendar_cannot_meet_is_refused(schedule: str) -> None:
    try:
        spec = tr(schedule=schedule)
    except ValueError:
        return  # the schema's pattern caught it first: as good
    (found,) = spec_rules.training_run(spec, "ns", POLICY)
    assert found.reason == reasons.INVALID_SPEC
    assert "spec.schedule" in found.message


def test_deployment_interval_and_queries() -> None:
    assert spec_rules.model_deployment(md(), "ns") == []

    def query(q: str) -> list[spec_rules.Refusal]:
        metrics = [{"name": "m", "query": q, "max": 1}]
        return spec_rules.model_deployment(md(analysis={"metrics": metrics}), "ns")

    assert query('sum(rate(x{version="{{version}}"}[5m]))') == []
    (broken,) = query("sum(rate(x[5m])")
    assert broken.reason == reasons.INVALID_SPEC
    assert broken.message.startswith("spec.rollout.analysis.metrics[0].query")
    for escape in (
        'x{namespace="other"}',
        'x{namespace!="ns"}',
        'x{namespace=~".+"}',
        '{__name__=~".+", namespace="other"}',
        'x or on() y{namespace="other"}',
        'max_over_time(x{namespace="other"}[5m:1m])',
    ):
        (unsafe,) = query(escape)
        assert unsafe.reason == spec_rules.UNSAFE_QUERY, escape


def test_drift_policy_durations_and_queries() -> None:
    signal = {"name": "psi", "type": "psi", "feature": "*", "threshold": 0.2}
    assert spec_rules.drift_policy(dp([signal]), "ns") == []
    (short,) = spec_rules.drift_policy(dp([signal], interval="5m", window="1m"), "ns")
    assert short.message == "spec.window='1m' must be at least spec.interval='5m'"
    promql = {"name": "q", "type": "promql", "query": 'x{namespace="b"}', "threshold": 1}
    (unsafe,) = spec_rules.drift_policy(dp([promql]), "ns")
    assert unsafe.message.startswith("spec.signals[0].query")


def test_the_webhook_configuration_names_each_kind_and_scopes_namespaces() -> None:
    body = webhook.configuration(
        "kubeloop-local-a", url="https://127.0.0.1:9443", ca_bundle="Q0E=", namespaces=["a"]
    )
    hooks = {h["name"]: h for h in body["webhooks"]}
    assert set(hooks) == {
        "validate-trainingrun.kubeloop.dev",
        "validate-modelversion.kubeloop.dev",
        "validate-modeldeployment.kubeloop.dev",
        "validate-driftpolicy.kubeloop.dev",
    }
    tr_hook = hooks["validate-trainingrun.kubeloop.dev"]
    assert tr_hook["clientConfig"]["url"] == "https://127.0.0.1:9443/validate-trainingrun"
    assert tr_hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
    assert tr_hook["failurePolicy"] == "Fail"
    assert tr_hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["a"]


def test_the_local_certificate_is_trusted_for_127_0_0_1_and_reused(tmp_path: Path) -> None:
    files = self_signed(tmp_path)
    ctx = ssl.create_default_context(cafile=str(files.ca))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(files.cert), str(files.key))
    assert files.key.stat().st_mode & 0o077 == 0
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    before = files.cert.read_bytes()
    assert self_signed(tmp_path).cert.read_bytes() == before  # valid: reused
    assert base64.b64encode(files.ca.read_bytes())
