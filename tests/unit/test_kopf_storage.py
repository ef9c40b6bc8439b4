"""kopf's state in the status: one write per reconcile, and objects an older operator handled
(their state in kubeloop.dev/ annotations) read and migrated in the same write."""

from __future__ import annotations

import json
from typing import Any

import kopf

from kubeloop.handlers.kopf_storage import MigratingDiffBaseStorage, MigratingProgressStorage

LEGACY = "kubeloop.dev/last-handled-configuration"
ESSENCE: dict[str, Any] = {"spec": {"modelName": "m", "version": 1}}


def body(annotations: dict[str, str] | None = None, status: dict[str, Any] | None = None) -> Any:
    raw = {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": "m-v1", "namespace": "ns", "annotations": annotations or {}},
        "spec": ESSENCE["spec"],
        "status": status or {},
    }
    return kopf.Body(raw)  # type: ignore[arg-type]  # a plain dict is a RawBody at runtime


def test_the_diff_base_is_stored_in_the_status_only() -> None:
    storage, patch = MigratingDiffBaseStorage(), kopf.Patch()
    storage.store(body=body(), patch=patch, essence=ESSENCE)
    assert json.loads(patch["status"]["kopf"]["last-handled-configuration"]) == ESSENCE
    assert "metadata" not in patch  # no second write, to the object


def test_an_older_objects_annotation_is_read_and_removed_in_the_same_write() -> None:
    storage, patch = MigratingDiffBaseStorage(), kopf.Patch()
    old = body({LEGACY: json.dumps(ESSENCE)})
    assert storage.fetch(body=old) == ESSENCE  # an upgrade does not re-run creation
    storage.store(body=old, patch=patch, essence=ESSENCE)
    assert patch["metadata"]["annotations"] == {LEGACY: None}
    assert "last-handled-configuration" in patch["status"]["kopf"]


def test_the_status_wins_over_a_stale_annotation() -> None:
    newer = {"spec": {"modelName": "m", "version": 2}}
    both = body(
        {LEGACY: json.dumps(ESSENCE)},
        {"kopf": {"last-handled-configuration": json.dumps(newer)}},
    )
    assert MigratingDiffBaseStorage().fetch(body=both) == newer


def test_the_essence_leaves_out_both_places() -> None:
    old = body(
        {LEGACY: json.dumps(ESSENCE), "team": "a"},
        {"kopf": {"last-handled-configuration": "{}"}},
    )
    essence = MigratingDiffBaseStorage().build(body=old)
    assert essence["metadata"]["annotations"] == {"team": "a"}
    assert "status" not in essence


def test_progress_goes_to_the_status_and_an_older_record_is_purged() -> None:
    storage, patch = MigratingProgressStorage(), kopf.Patch()
    key = kopf.HandlerId("reconcile_model_version")
    legacy = {f"kubeloop.dev/{key}": json.dumps({"retries": 2, "started": "2026-01-01T00:00:00"})}
    old = body(legacy)
    record = storage.fetch(key=key, body=old)
    assert record is not None
    assert record["retries"] == 2  # a retry in flight survives the upgrade
    storage.store(key=key, record={**record, "retries": 3}, body=old, patch=patch)
    assert patch["status"]["kopf"]["progress"][key]["retries"] == 3
    assert patch["metadata"]["annotations"] == {f"kubeloop.dev/{key}": None}


def test_the_one_copy_build_equals_kopfs_own() -> None:
    """The essence built once is the one kopf's storages build (so neither a resumed object
    nor a migrated one looks changed)."""
    rich = body(
        {
            LEGACY: json.dumps(ESSENCE),
            "kubeloop.dev/approve": "true",
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "team": "a",
        },
        {"kopf": {"last-handled-configuration": "{}"}, "phase": "Ready", "conditions": []},
    )
    rich["metadata"]["labels"] = {"app": "x"}
    ours = MigratingDiffBaseStorage()
    theirs = kopf.MultiDiffBaseStorage([ours.status, ours.legacy])
    assert ours.build(body=rich) == theirs.build(body=rich)
    progress = MigratingProgressStorage()
    reference = kopf.MultiProgressStorage([progress.status, progress.legacy])
    essence = ours.build(body=rich)
    assert progress.clear(essence=essence) == reference.clear(essence=essence)
