"""Tenancy of URIs: what a tenant (a namespace) may read and write, judged from the text.

Each namespace owns ``<artifact root>/<namespace>/`` on the filesystem and
``<object-store prefix><namespace>/`` in the object store; the platform team may allow a
namespace more prefixes (``KUBELOOP_DATA_ALLOWLIST``, the chart's ``tenancy.dataAllowlist``) for
the data it reads. A URI is judged after normalisation, never by its text alone: a ``file:``
URI with a host, a percent-encoded character, a query or a fragment, a ``..`` or ``.`` segment,
or a control character is refused outright, so that no reader can decode it into a different
path than the one judged here. Symlinks are resolved by ``backends.tenancy`` where the operator
sees the filesystem. ``builtin://`` datasets are open to every tenant.

Pure: no I/O.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

OBJECT_STORES = ("s3", "gs")


@dataclass(frozen=True)
class Policy:
    """Where tenants' URIs may point (the operator's settings, parsed at the edge)."""

    artifact_root: str
    object_store_prefix: str = ""
    # namespace → extra URI prefixes its data may come from ("*" applies to every namespace)
    allowlist: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def tenant_prefixes(self, namespace: str) -> tuple[str, ...]:
        """The namespace's own prefixes: its directory and its object-store folder."""
        own = [f"file://{PurePosixPath(self.artifact_root) / namespace}/"]
        if self.object_store_prefix:
            own.append(f"{self.object_store_prefix.rstrip('/')}/{namespace}/")
        return tuple(own)

    def data_prefixes(self, namespace: str) -> tuple[str, ...]:
        """Where the namespace's training data may come from."""
        extra = (*self.allowlist.get("*", ()), *self.allowlist.get(namespace, ()))
        return (*self.tenant_prefixes(namespace), *extra)


def normalised(uri: str) -> str | None:
    """The URI in its one canonical form, or None when it can be read as more than one path
    (encoded characters, dot segments, a host on ``file:``, control characters)."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in uri) or "\\" in uri:
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.query or parts.fragment or "%" in uri:
        return None
    segments = parts.path.split("/")
    if any(s in (".", "..") for s in segments):
        return None
    if parts.scheme == "file":
        if parts.netloc or not uri.startswith("file:///"):
            return None
        return f"file://{PurePosixPath(parts.path)}"
    if parts.scheme in OBJECT_STORES:
        if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
            return None
        path = "/".join(s for s in segments if s)
        return (
            f"{parts.scheme}://{parts.netloc}/{path}"
            if path
            else f"{parts.scheme}://{parts.netloc}"
        )
    return uri


def under(uri: str, prefix: str) -> bool:
    """Whether the normalised ``uri`` is ``prefix`` itself or lies below it (by segment: the
    prefix ``file:///data/a`` does not admit ``file:///data/ab``)."""
    base = normalised(prefix.rstrip("/")) if prefix.rstrip("/") else None
    if base is None:
        return False
    return uri == base or uri.startswith(base.rstrip("/") + "/")


def data_uri_problem(uri: str, namespace: str, where: str, policy: Policy) -> str:
    """Why a tenant may not read training data at ``uri`` ('' if it may); names ``where``."""
    if uri.startswith("builtin://"):
        return ""
    canonical = normalised(uri)
    if canonical is None:
        return (
            f"{where} {uri!r} is refused: a data URI may not carry a host on file:, "
            "percent-encoded characters, '.' or '..' segments, a query, a fragment or control "
            "characters (it is judged after normalisation)"
        )
    allowed = policy.data_prefixes(namespace)
    if any(under(canonical, p) for p in allowed):
        return ""
    return (
        f"{where} {uri!r} lies outside namespace {namespace}'s data: it must be under "
        f"{' or '.join(allowed)} (each namespace reads only its own prefix or what the "
        "platform allowlists for it)"
    )


def artifact_uri_problem(uri: str, namespace: str, where: str, policy: Policy) -> str:
    """Why a tenant may not register an artifact at ``uri`` ('' if it may). Artifacts are
    held to the tenant's own prefixes (no allowlist). An object-store artifact is free when no
    object-store prefix is set, and a ``pvc://`` claim is the namespace's own by construction:
    there the store's or the cluster's access control decides."""
    canonical = normalised(uri)
    if canonical is None:
        return (
            f"{where} {uri!r} is refused: an artifact URI may not carry a host on file:, "
            "percent-encoded characters, '.' or '..' segments, a query or a fragment"
        )
    scheme = canonical.split("://", 1)[0]
    if scheme == "file":
        wanted = policy.tenant_prefixes(namespace)[0]
    elif scheme in OBJECT_STORES and policy.object_store_prefix:
        # The prefix's bucket path, in the artifact's own store scheme.
        path = policy.object_store_prefix.split("://", 1)[-1].rstrip("/")
        wanted = f"{scheme}://{path}/{namespace}/"
    else:
        return ""
    if under(canonical, wanted):
        return ""
    return f"{where} {uri!r} must lie under {wanted} (each namespace owns its own artifact prefix)"
