"""Tenancy of URIs: judged after normalisation, symlinks included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubeloop.backends.tenancy import link_escape
from kubeloop.planning import tenancy

POLICY = tenancy.Policy(
    "/art",
    "s3://lake/tenants/",
    {"team-a": ("s3://shared/datasets/", "file:///mnt/public/"), "*": ("gs://open/",)},
)


@pytest.mark.parametrize(
    "uri",
    [
        "file:///art/team-a/data/train.csv",
        "file:///art/team-a//data/./x.csv".replace("/./", "/"),  # '//' collapses
        "s3://lake/tenants/team-a/churn.parquet",
        "s3://shared/datasets/iris.csv",  # allowlisted for team-a
        "file:///mnt/public/iris.csv",  # allowlisted for team-a
        "gs://open/mnist/",  # allowlisted for every namespace
        "builtin://breast-cancer",
    ],
)
def test_a_tenant_reads_its_own_prefix_and_its_allowlist(uri: str) -> None:
    assert tenancy.data_uri_problem(uri, "team-a", "spec.data.uri", POLICY) == ""


@pytest.mark.parametrize(
    "uri",
    [
        "file:///art/team-b/data/train.csv",  # another tenant
        "file:///etc/passwd",
        "file:///art/team-a/../team-b/x.csv",  # traversal
        "file:///art/team-a/./x.csv",
        "file://evil-host/art/team-a/x.csv",  # a host on file:
        "file://localhost/art/team-a/x.csv",
        "file:/art/team-a/x.csv",  # not file:///
        "file:///art/team-a/%2e%2e/team-b/x.csv",  # encoded dot segment
        "file:///art/team-a%2F..%2Fteam-b/x.csv",  # encoded separator
        "file:///art/team-a/x.csv?x=1",
        "file:///art/team-a/x.csv#frag",
        "file:///art/team-a/x\x00.csv",
        "file:///art/team-ab/x.csv",  # a sibling sharing the prefix's text
        "s3://lake/tenants/team-b/churn.parquet",
        "s3://lake/tenants/team-a/../team-b/x",
        "s3://user:pw@lake/tenants/team-a/x",
        "s3://shared/datasets-private/x",  # the allowlist is judged by segment too
        "gs://lake/tenants/team-a/x",  # the prefix is an s3 one
    ],
)
def test_anything_else_is_refused_naming_the_field(uri: str) -> None:
    why = tenancy.data_uri_problem(uri, "team-a", "spec.data.extra[0].uri", POLICY)
    assert why.startswith("spec.data.extra[0].uri"), why


def test_the_allowlist_is_per_namespace() -> None:
    assert tenancy.data_uri_problem("s3://shared/datasets/x", "team-b", "f", POLICY) != ""
    assert tenancy.data_uri_problem("gs://open/x", "team-b", "f", POLICY) == ""


def test_without_an_object_store_prefix_object_store_data_needs_the_allowlist() -> None:
    policy = tenancy.Policy("/art")
    assert "outside namespace ns" in tenancy.data_uri_problem("s3://b/x", "ns", "f", policy)


def test_artifacts_are_held_to_the_tenant_prefix_only() -> None:
    assert tenancy.artifact_uri_problem("file:///art/ns/m/1", "ns", "a", POLICY) == ""
    assert "must lie under file:///art/ns/" in tenancy.artifact_uri_problem(
        "file:///art/other/m", "ns", "a", POLICY
    )
    assert tenancy.artifact_uri_problem("file:///art/ns/../other/m", "ns", "a", POLICY)
    # No allowlist for artifacts.
    assert tenancy.artifact_uri_problem("file:///mnt/public/m", "team-a", "a", POLICY)
    # The prefix's bucket path, in either store.
    assert tenancy.artifact_uri_problem("s3://lake/tenants/ns/m", "ns", "a", POLICY) == ""
    assert tenancy.artifact_uri_problem("gs://lake/tenants/ns/m", "ns", "a", POLICY) == ""
    assert "s3://lake/tenants/ns/" in tenancy.artifact_uri_problem(
        "s3://lake/tenants/other/m", "ns", "a", POLICY
    )
    # Without a prefix the store's own access control decides; a claim is the namespace's.
    assert tenancy.artifact_uri_problem("s3://any/x", "ns", "a", tenancy.Policy("/art")) == ""
    assert tenancy.artifact_uri_problem("pvc://claim/m", "ns", "a", POLICY) == ""


def test_a_symlink_out_of_the_tenant_prefix_is_found(tmp_path: Path) -> None:
    own, other = tmp_path / "ns", tmp_path / "other"
    own.mkdir()
    other.mkdir()
    (other / "secret.csv").write_text("a,b\n1,2\n")
    (own / "link.csv").symlink_to(other / "secret.csv")
    (own / "dir").symlink_to(other)
    (own / "real.csv").write_text("a,b\n")
    allowed = [f"file://{own}/"]
    assert link_escape(f"file://{own}/real.csv", "spec.data.uri", allowed) == ""
    for uri in (f"file://{own}/link.csv", f"file://{own}/dir/secret.csv"):
        why = link_escape(uri, "spec.data.uri", allowed)
        assert why.startswith("spec.data.uri"), why
        assert str(other) in why, why
    # A missing file resolves to itself: the text rule is what holds.
    assert link_escape(f"file://{own}/later.csv", "spec.data.uri", allowed) == ""
    # The tenant root itself behind a symlink is fine (both sides are resolved).
    alias = tmp_path / "alias"
    os.symlink(own, alias)
    assert link_escape(f"file://{alias}/real.csv", "f", allowed) == ""
