"""The registry rules other kinds rely on, and a namespace's GPU budget — without a server."""

from __future__ import annotations

from typing import Any, get_args

import pytest

from kubeloop import reasons
from kubeloop.api.model_deployment import ModelSource
from kubeloop.api.model_version import ModelVersion, ModelVersionSpec
from kubeloop.api.training_run import GateMetric
from kubeloop.contract import durations, evaluation, steps
from kubeloop.contract.labels import ATTEMPT_LABEL, TRAINING_RUN_LABEL
from kubeloop.planning import admission, naming
from kubeloop.planning import registry as rules


def mv(version: int, *, phase: str = "Ready", aliases: tuple[str, ...] = (),
       inputs: tuple[str, ...] = ("a", "b"), labels: dict[str, str] | None = None,
       model: str = "m") -> ModelVersion:  # fmt: skip
    return ModelVersion.parse(
        {
            "metadata": {"name": f"{model}-v{version}", "namespace": "ns", "labels": labels or {}},
            "spec": {
                "modelName": model,
                "version": version,
                "artifact": {"uri": f"file:///art/ns/{model}/{version}"},
                "signature": {"inputs": [{"name": n, "dtype": "float32"} for n in inputs]},
            },
            "status": {"phase": phase, "aliases": list(aliases)},
        }
    )


def source(**fields: Any) -> ModelSource:
    return ModelSource.model_validate(fields)


def test_an_alias_resolves_to_its_ready_holder_and_latest_to_the_highest_ready() -> None:
    versions = [mv(1, aliases=("production",)), mv(2), mv(3, phase="Pending")]
    held = rules.alias_holder(versions, "m", "production")
    assert held.version is not None
    assert held.version.name == "m-v1"
    latest = rules.alias_holder(versions, "m", "latest")
    assert latest.version is not None
    assert latest.version.name == "m-v2"
    missing = rules.alias_holder(versions, "m", "staging")
    assert missing.version is None
    assert missing.reason == reasons.MODEL_VERSION_NOT_FOUND
    assert "'staging'" in missing.problem


def test_a_source_names_what_it_cannot_resolve() -> None:
    versions = [mv(1), mv(2, phase="Pending")]
    assert (
        rules.resolve_source(
            source(modelVersion={"name": "m-v1"}), versions, run_registered=""
        ).version
        == versions[0]
    )
    pending = rules.resolve_source(source(modelVersion={"name": "m-v2"}), versions,
                                   run_registered="")  # fmt: skip
    assert pending.reason == reasons.MODEL_VERSION_NOT_READY
    run = source(trainingRun={"name": "tr"})
    assert "not found" in rules.resolve_source(run, versions, run_registered=None).problem
    assert "has not registered" in rules.resolve_source(run, versions, run_registered="").problem
    found = rules.resolve_source(run, versions, run_registered="m-v1")
    assert found.version is not None
    assert found.version.name == "m-v1"


def test_a_version_with_other_inputs_cannot_replace_the_stable_one() -> None:
    assert rules.incompatible(mv(1), mv(2)) == ""
    assert rules.incompatible(None, mv(2)) == ""
    why = rules.incompatible(mv(1), mv(2, inputs=("a", "c")))
    assert "m-v2's input signature" in why
    assert "m-v1's" in why


def test_next_version_is_above_every_known_and_every_refused_number() -> None:
    assert rules.next_version([]) == 1
    assert rules.next_version([1, 3, 2]) == 4
    assert rules.next_version([1], after=4) == 5


def test_a_registered_version_carries_the_run_and_attempt_and_validates() -> None:
    manifest = {
        "spec": {
            "artifact": {"uri": "file:///art/ns/m/1"},
            "lineage": {"datasetUri": "builtin://fraud"},
            "predictionReference": {"edges": [0.0, 0.5, 1.0], "fractions": [0.7, 0.3]},
        }
    }
    body = rules.build_registered_version(
        manifest, model="fraud", version=3, namespace="ns", training_run="tr", attempt=2,
        run_id="run-9", spec_hash="abc", labels={"team": "risk"},
    )  # fmt: skip
    assert body["metadata"]["name"] == "fraud-v3"
    assert body["metadata"]["labels"] == {
        "team": "risk",
        TRAINING_RUN_LABEL: "tr",
        ATTEMPT_LABEL: "2",
    }
    spec = ModelVersionSpec.model_validate(body["spec"])
    assert spec.lineage is not None
    assert (spec.lineage.training_run, spec.lineage.pipeline_run_id) == ("tr", "run-9")
    assert spec.prediction_reference is not None
    assert spec.prediction_reference.fractions == [0.7, 0.3]
    versions = [mv(1, labels={TRAINING_RUN_LABEL: "tr", ATTEMPT_LABEL: "2"})]
    assert [v.name for v in rules.registered_by(versions, "tr", 2)] == ["m-v1"]
    assert rules.registered_by(versions, "tr", 3) == []


def test_the_parent_version_a_run_retrains_is_recorded_in_the_lineage() -> None:
    manifest = {
        "spec": {
            "artifact": {"uri": "file:///art/ns/m/1"},
            "lineage": {"datasetUri": "builtin://fraud", "datasetSha256": "d" * 64},
        }
    }
    args: dict[str, Any] = {
        "model": "fraud", "version": 4, "namespace": "ns", "training_run": "retrain",
        "attempt": 1, "run_id": "run-1", "spec_hash": "abc", "labels": {},
    }  # fmt: skip
    body = rules.build_registered_version(manifest, parent_version="fraud-v3", **args)
    lineage = ModelVersionSpec.model_validate(body["spec"]).lineage
    assert lineage is not None
    assert lineage.parent_version == "fraud-v3"
    assert (lineage.dataset_sha256, lineage.training_run) == ("d" * 64, "retrain")
    plain = rules.build_registered_version(manifest, **args)
    assert "parentVersion" not in plain["spec"]["lineage"]
    with pytest.raises(ValueError, match="parentVersion"):
        rules.build_registered_version(manifest, parent_version="Not A Label", **args)


def test_a_manifest_the_registry_would_refuse_is_refused_before_the_write() -> None:
    with pytest.raises(ValueError, match="artifact"):
        rules.build_registered_version(
            {"spec": {}}, model="m", version=1, namespace="ns", training_run="tr", attempt=1,
            run_id="", spec_hash="", labels={},
        )  # fmt: skip


def budget(**kw: Any) -> admission.GpuBudget:
    args: dict[str, Any] = {
        "run": "me",
        "resource": "nvidia.com/gpu",
        "setting": None,
        "quotas": [],
        "others": [],
        "admitted": {},
    }
    return admission.gpu_budget(**{**args, **kw})


def test_the_smaller_of_setting_and_quota_limits_the_namespace() -> None:
    assert budget().limit is None
    assert budget(setting=4).limit == 4
    quota = admission.Quota("gpu-quota", {"requests.nvidia.com/gpu": "2"})
    limited = budget(setting=4, quotas=[quota])
    assert (limited.limit, limited.source) == (2, "ResourceQuota gpu-quota")
    assert budget(setting=1, quotas=[quota]).limit == 1


def test_gpus_in_use_count_running_runs_and_the_admission_ledger_once() -> None:
    others = [
        admission.RunUsage("a", "Running", 1),
        admission.RunUsage("b", "Succeeded", 4),
        admission.RunUsage("me", "Running", 2),  # the run being admitted is not counted
    ]
    assert budget(setting=8, others=others).in_use == 1
    # "c" was admitted a moment ago and the API does not show it Running yet; "a" is in both.
    assert budget(setting=8, others=others, admitted={"c": 2, "a": 1, "me": 2}).in_use == 3
    assert admission.quantity("2.0") == 2
    assert admission.quantity("lots") == 0


def test_run_keys_and_uris_stay_under_the_tenant_prefix() -> None:
    key = naming.run_key("fraud", "1234abcd-ef00")
    assert key == "fraud-1234abcd"
    local = naming.run_uri("ns", key, 2, artifact_root="/art", object_store_prefix="")
    assert local == "file:///art/ns/fraud-1234abcd/attempt-2"
    remote = naming.run_uri("ns", key, 1, artifact_root="/art", object_store_prefix="s3://b/p/")
    assert remote == "s3://b/p/ns/fraud-1234abcd/attempt-1"


def test_the_contract_agrees_with_the_api() -> None:
    assert set(get_args(GateMetric)) == set(evaluation.ALL_METRICS)
    assert durations.seconds("1h30m") == 5400
    stamp = durations.parse_rfc3339("2026-11-26T12:00:00Z")
    assert stamp is not None
    assert durations.rfc3339(stamp) == "2026-11-26T12:00:00Z"
    assert durations.parse_rfc3339("") is None
    for step, display in steps.DISPLAY_NAMES.items():
        assert steps.step_of_task(display) == step
        assert steps.step_of_task(f"{display}-2") == step
    assert steps.step_of_task("condition-1") == ""
    assert set(steps.DISPLAY_NAMES) == set(steps.STEPS)


def regression(version: int, edges: list[float] | None) -> ModelVersion:
    body = mv(version).model_dump(by_alias=True, mode="json")
    body["spec"]["task"] = "regression"
    if edges is not None:
        body["spec"]["predictionReference"] = {
            "edges": edges,
            "fractions": [0.5] * (len(edges) - 1),
        }
    return ModelVersion.parse(body)


def test_regression_versions_share_the_first_versions_prediction_edges() -> None:
    versions = [regression(3, [0.0, 5.0, 9.0]), regression(1, None), regression(2, [1.0, 2.0])]
    assert rules.shared_prediction_edges(versions, "m") == (1.0, 2.0)  # v1 has none: v2's
    assert rules.shared_prediction_edges([mv(1), mv(2)], "m") == ()  # classifiers: fixed edges
    assert rules.shared_prediction_edges(versions, "other") == ()


def test_the_request_log_lies_under_the_tenant_prefix_or_nowhere() -> None:
    local = naming.request_log_uri("ns", "churn", artifact_root="/art", object_store_prefix="")
    assert local == "file:///art/ns/serving/churn/requests"
    remote = naming.request_log_uri(
        "ns", "churn", artifact_root="/art", object_store_prefix="s3://b/p", remote=True
    )
    assert remote == "s3://b/p/ns/serving/churn/requests"
    # a KServe pod cannot write the operator's local disk
    assert (
        naming.request_log_uri(
            "ns", "churn", artifact_root="/art", object_store_prefix="", remote=True
        )
        == ""
    )


def test_a_placement_needs_a_known_stable_version() -> None:
    from kubeloop.planning.placement import build_placement

    known = {"m-v1": mv(1), "m-v2": mv(2)}
    assert build_placement(known, (None, None, 0)) is None
    assert build_placement(known, ("m-v9", None, 0)) is None
    placed = build_placement(known, ("m-v1", "m-v2", 25), request_log_uri="file:///x")
    assert placed is not None
    assert (placed.stable.version, placed.canary.version if placed.canary else None) == (
        "m-v1",
        "m-v2",
    )
    assert (placed.canary_weight, placed.request_log_uri) == (25, "file:///x")
    assert build_placement(known, ("m-v1", "m-v7", 25)) == build_placement(
        known, ("m-v1", None, 25)
    )
