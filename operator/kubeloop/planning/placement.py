"""What a ModelDeployment wants served and what its backend saw: plain values shared by the
rollout's planning, the InferenceService builder and the serving backends."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from kubeloop.api.model_deployment import Serving
from kubeloop.api.model_version import ModelVersion
from kubeloop.contract.durations import seconds


@dataclass(frozen=True)
class Served:
    """One version to serve: the ModelVersion's name and its artifact."""

    version: str  # ModelVersion name, e.g. churn-v2 (the `version` label of its metrics)
    uri: str  # artifact URI
    format: str = "torch"


@dataclass(frozen=True)
class Placement:
    """What the rollout wants served now."""

    stable: Served
    canary: Served | None = None
    canary_weight: int = 0  # percent of requests to the canary, 0..100
    # Where the runtime logs requests ('' = nowhere) and the prediction-histogram edges every
    # version of the model shares (() = the runtime's own rule); the same for both versions.
    request_log_uri: str = ""
    prediction_edges: tuple[float, ...] = ()


@dataclass(frozen=True)
class ServingState:
    """What the backend observed after applying a placement."""

    stable_ready: bool
    canary_ready: bool
    url: str = ""
    message: str = ""  # a failure to report (a crashed server, a KServe error); '' otherwise


def build_placement(
    versions: Mapping[str, ModelVersion],
    decided: tuple[str | None, str | None, int],
    *,
    request_log_uri: str = "",
    prediction_edges: tuple[float, ...] = (),
) -> Placement | None:
    """The placement of the ``decided`` (stable, canary, weight) among known ``versions``;
    None while the stable version is unknown."""
    stable, canary, weight = decided
    if stable is None or stable not in versions:
        return None

    def served(mv: ModelVersion) -> Served:
        return Served(mv.name, mv.spec.artifact.uri, mv.spec.artifact.format)

    extra = served(versions[canary]) if canary is not None and canary in versions else None
    return Placement(served(versions[stable]), extra, weight, request_log_uri, prediction_edges)


def runtime_options(serving: Serving, placement: Placement) -> list[str]:
    """The serving runtime's flags, the same for every backend: batching and caching, the
    device (CUDA when the deployment requests GPUs), label feedback, the request log and the
    shared prediction edges."""
    args: list[str] = []
    if serving.batching.enabled:
        args += [
            "--max-batch-size",
            str(serving.batching.max_batch_size),
            "--max-latency-ms",
            str(serving.batching.max_latency_ms),
        ]
    if serving.cache.enabled:
        args += [
            "--cache-size",
            str(serving.cache.max_entries),
            "--cache-ttl",
            str(serving.cache.ttl_seconds),
        ]
    if serving.resources.gpu > 0:
        args += ["--device", "cuda"]
    monitoring = serving.monitoring
    args += ["--feedback-ttl", str(seconds(monitoring.feedback_ttl))]
    if placement.request_log_uri and monitoring.request_log.enabled:
        args += [
            "--request-log-uri",
            placement.request_log_uri,
            "--request-log-sample",
            str(monitoring.request_log.sample_rate),
            "--request-log-max-rows",
            str(monitoring.request_log.max_rows),
            "--request-log-flush-interval",
            str(seconds(monitoring.request_log.flush_interval)),
        ]
    if placement.prediction_edges:
        args += ["--prediction-edges", json.dumps(list(placement.prediction_edges))]
    return args


def endpoint_path(serving: Serving, deployment: str) -> str:
    """The inference route clients of ``serving.protocol`` call."""
    if serving.protocol == "v1":
        return f"/v1/models/{deployment}:predict"
    return f"/v2/models/{deployment}/infer"


def readiness_path(serving: Serving, deployment: str) -> str:
    """The route that says the model is loaded, in ``serving.protocol``."""
    if serving.protocol == "v1":
        return f"/v1/models/{deployment}"
    return "/v2/health/ready"
