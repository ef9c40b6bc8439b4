"""The TrainingRun fields a DriftPolicy's retraining run uses: ``data.since``, ``data.extra``,
``suspend`` and ``registration.parentVersion``, in the model and in the generated CRD."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from pydantic import ValidationError

from kubeloop.api.crdgen import crd_for
from kubeloop.api.training_run import (
    TIMESTAMP_PATTERN,
    TrainingRun,
    TrainingRunSpec,
    parse_timestamp,
)


def spec(data: dict[str, Any] | None = None, **extra: Any) -> TrainingRunSpec:
    body: dict[str, Any] = {
        "data": {"uri": "file:///logs/churn", "format": "requestLog", "target": "churned"}
        | (data or {}),
        "registration": {"modelName": "churn"},
    }
    return TrainingRunSpec.model_validate(body | extra)


def test_the_new_fields_default_to_what_ran_before() -> None:
    plain = spec()
    assert plain.data.since is None
    assert plain.data.extra == []
    assert plain.suspend is False
    assert plain.registration.parent_version is None


def test_since_is_an_rfc3339_time_with_an_offset() -> None:
    assert spec({"since": "2026-12-01T14:00:00Z"}).data.since == "2026-12-01T14:00:00Z"
    assert parse_timestamp("2026-12-01T14:00:00Z") == dt.datetime(2026, 12, 1, 14, tzinfo=dt.UTC)
    assert parse_timestamp("2026-12-01T15:30:00.25+01:30") == dt.datetime(
        2026, 12, 1, 14, 0, 0, 250000, tzinfo=dt.UTC
    )
    for bad in ("2026-12-01T14:00:00", "2026-12-01 14:00:00Z", "yesterday", "2026-12-01"):
        with pytest.raises(ValidationError, match="since"):
            spec({"since": bad})
        assert not re.match(TIMESTAMP_PATTERN, bad)  # the API server refuses it too
    with pytest.raises(ValidationError, match="not an RFC 3339 time stamp"):
        spec({"since": "2026-13-01T14:00:00Z"})  # the shape is right, the month is not


def test_extra_sources_are_bounded_and_checked_like_the_main_one() -> None:
    extra = [{"uri": "file:///logs/churn", "format": "requestLog", "since": "2026-12-01T14:00:00Z"}]
    parsed = spec({"format": "csv", "uri": "s3://bucket/churn.csv", "extra": extra}).data.extra
    assert (parsed[0].uri, parsed[0].format, parsed[0].since) == (
        "file:///logs/churn", "requestLog", "2026-12-01T14:00:00Z",
    )  # fmt: skip
    with pytest.raises(ValidationError, match="at most 4"):
        spec({"extra": [{"uri": "builtin://breast-cancer"}] * 5})
    with pytest.raises(ValidationError, match="uri"):
        spec({"extra": [{"uri": "http://example.com/x.csv"}]})
    with pytest.raises(ValidationError, match="format"):
        spec({"extra": [{"uri": "builtin://breast-cancer", "format": "excel"}]})


def test_parent_version_is_a_dns_label() -> None:
    registration = {"modelName": "churn", "parentVersion": "churn-v3"}
    assert spec(registration=registration).registration.parent_version == "churn-v3"
    with pytest.raises(ValidationError, match="parentVersion"):
        spec(registration={"modelName": "churn", "parentVersion": "Churn V3"})


def test_the_crd_carries_the_fields_and_the_since_rule() -> None:
    root = crd_for(TrainingRun)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec_node = root["properties"]["spec"]["properties"]
    data = spec_node["data"]
    extra = data["properties"]["extra"]
    assert extra["maxItems"] == 4
    item = extra["items"]
    assert item["required"] == ["uri"]
    assert item["properties"]["format"]["enum"] == data["properties"]["format"]["enum"]
    for node in (data, item):
        assert node["properties"]["since"]["pattern"] == TIMESTAMP_PATTERN
        (rule,) = [r for r in node["x-kubernetes-validations"] if "since" in r["rule"]]
        assert rule["rule"] == "!has(self.since) || self.format == 'requestLog'"
        assert rule["fieldPath"] == ".since"
    assert spec_node["suspend"] == {
        "default": False,
        "description": spec_node["suspend"]["description"],
        "type": "boolean",
    }
    assert "kubeloop.dev/approve=true" in spec_node["suspend"]["description"]
    assert "does not stop" in spec_node["suspend"]["description"]
    assert "Suspended" in root["properties"]["status"]["properties"]["phase"]["enum"]
    parent = spec_node["registration"]["properties"]["parentVersion"]
    assert parent["maxLength"] == 63
