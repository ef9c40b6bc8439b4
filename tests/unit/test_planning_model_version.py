"""Registry decisions without any server."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from kubeloop import reasons
from kubeloop.api.model_version import ModelVersion
from kubeloop.planning import model_version as plan
from kubeloop.planning.conditions import find

NOW = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def mv(
    name: str,
    version: int,
    *,
    aliases: list[str] | None = None,
    created: str = "",
    uri: str = "file:///art/ns/m",
    **status: Any,
) -> ModelVersion:
    return ModelVersion.model_validate(
        {
            "metadata": {
                "name": name,
                "namespace": "ns",
                "generation": 1,
                "uid": f"uid-{name}",
                "creationTimestamp": created or f"2026-01-01T00:00:0{version}Z",
            },
            "spec": {
                "modelName": "m",
                "version": version,
                "artifact": {"uri": uri},
                "aliases": aliases or [],
                "metrics": {"accuracy": 0.9, "f1": 0.8123},
            },
            "status": status,
        }
    )


def entry(version: ModelVersion, *, deleting: bool = False) -> plan.VersionEntry:
    body = version.model_dump(by_alias=True)
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-03-01T00:00:00Z"
    return plan.VersionEntry.from_body(body)


def test_alias_removals_take_claimed_aliases_from_every_other_holder() -> None:
    claimant = mv("m-v3", 3, aliases=["production"])
    siblings = [
        entry(mv("m-v1", 1, aliases=["production", "latest"])),
        entry(mv("m-v2", 2)),
        entry(claimant),
    ]
    assert plan.alias_removals(claimant, siblings) == {"m-v1": ["production"]}


def test_ready_plan_sets_conditions_aliases_and_events() -> None:
    version = mv("m-v1", 1, aliases=["production"])
    result = plan.plan_model_version(
        version,
        policy=None,
        artifact=plan.ArtifactObservation(exists=True, sha256="x"),
        now=NOW,
    )
    assert result.problem is None
    assert result.status.phase == "Ready"
    assert result.status.aliases == ["production"]
    assert result.status.primary_metric == "f1=0.8123"
    ready = find(result.status.conditions, reasons.READY)
    assert ready is not None
    assert ready.status == "True"
    assert ready.observed_generation == 1
    assert [e[1] for e in result.events] == [reasons.ALIAS_CLAIMED]  # Ready is no Event


def test_name_must_be_model_dash_v_version() -> None:
    wrong = ModelVersion.model_validate(
        {**mv("m-v1", 1).model_dump(by_alias=True), "metadata": {"name": "m-latest"}}
    )
    result = plan.plan_model_version(
        wrong, policy=None, artifact=plan.ArtifactObservation(), now=NOW
    )
    assert result.problem is not None
    assert result.problem.reason == reasons.INVALID_NAME
    assert "'m-v1'" in result.problem.message
    assert not result.problem.retry


def test_missing_artifact_is_retryable_and_mismatch_is_not() -> None:
    missing = plan.plan_model_version(
        mv("m-v1", 1),
        policy=None,
        artifact=plan.ArtifactObservation(exists=False),
        now=NOW,
    )
    assert missing.problem is not None
    assert missing.problem.retry
    assert missing.status.phase == "Pending"
    mismatch_mv = ModelVersion.model_validate(
        {
            **mv("m-v1", 1).model_dump(by_alias=True),
            "spec": {
                **mv("m-v1", 1).spec.model_dump(by_alias=True),
                "artifact": {"uri": "file:///art/ns/m", "sha256": "a" * 64},
            },
        }
    )
    bad = plan.plan_model_version(
        mismatch_mv,
        policy=None,
        artifact=plan.ArtifactObservation(exists=True, sha256="b"),
        now=NOW,
    )
    assert bad.problem is not None
    assert not bad.problem.retry
    assert bad.problem.reason == reasons.ARTIFACT_DIGEST_MISMATCH
    assert bad.status.phase == "Failed"


def test_registry_index_lists_versions_owners_and_alias_holders() -> None:
    versions = [
        entry(mv("m-v2", 2, aliases=["candidate"])),
        entry(mv("m-v1", 1, aliases=["production"])),
        entry(mv("m-v3", 3), deleting=True),
    ]
    cm = plan.build_registry_index("m", "ns", versions)
    assert cm["metadata"]["name"] == "kubeloop-registry-m"
    assert [o["uid"] for o in cm["metadata"]["ownerReferences"]] == ["uid-m-v1", "uid-m-v2"]
    index = json.loads(cm["data"]["index.json"])
    assert index["aliases"] == {"candidate": "m-v2", "production": "m-v1"}
    assert [v["version"] for v in index["versions"]] == [1, 2]
