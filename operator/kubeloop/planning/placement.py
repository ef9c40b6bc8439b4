"""What a ModelDeployment wants served and what its backend saw: plain values shared by the
rollout's planning, the InferenceService builder and the serving backends."""

from __future__ import annotations

from dataclasses import dataclass

from kubeloop.api.model_deployment import Serving


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


@dataclass(frozen=True)
class ServingState:
    """What the backend observed after applying a placement."""

    stable_ready: bool
    canary_ready: bool
    url: str = ""
    message: str = ""  # a failure to report (a crashed server, a KServe error); '' otherwise


def runtime_options(serving: Serving) -> list[str]:
    """The serving runtime's flags for batching and caching, the same for every backend."""
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
    return args
