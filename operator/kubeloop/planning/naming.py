"""Deterministic child names: the same parent always yields the same child name, so a
restarted operator finds what it created instead of creating it twice."""

from __future__ import annotations

import hashlib

MAX_NAME = 63


def child_name(*parts: str, max_length: int = MAX_NAME) -> str:
    """Join ``parts`` with '-'; when too long, truncate and add a short stable hash."""
    name = "-".join(p.strip("-") for p in parts if p)
    if len(name) <= max_length:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: max_length - 9].rstrip('-')}-{digest}"


def registry_index_name(model_name: str) -> str:
    """ConfigMap that indexes every version and alias of one registered model."""
    return child_name("kubeloop-registry", model_name)


def run_key(name: str, uid: str) -> str:
    """A TrainingRun's name in executors and artifact paths: name plus a piece of the uid, so a
    TrainingRun deleted and created again under the same name never sees the old runs."""
    short = uid.replace("-", "")[:8]
    return f"{name}-{short}" if short else name


def run_uri(
    namespace: str, key: str, attempt: int, *, artifact_root: str, object_store_prefix: str
) -> str:
    """An attempt's run directory, under the tenant's artifact prefix."""
    where = f"{namespace}/{key}/attempt-{attempt}"
    if object_store_prefix:
        return f"{object_store_prefix.rstrip('/')}/{where}"
    return f"file://{artifact_root}/{where}"


def request_log_uri(
    namespace: str,
    deployment: str,
    *,
    artifact_root: str,
    object_store_prefix: str,
    remote: bool = False,
) -> str:
    """Where a ModelDeployment's served requests are logged, under the tenant's prefix ('' for
    a ``remote`` server, e.g. a KServe pod, without an object store: it cannot write the
    operator's local artifact root)."""
    if remote and not object_store_prefix:
        return ""
    where = f"{namespace}/serving/{deployment}/requests"
    if object_store_prefix:
        return f"{object_store_prefix.rstrip('/')}/{where}"
    return f"file://{artifact_root}/{where}"
