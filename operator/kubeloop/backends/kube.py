"""A small async Kubernetes client: the operator's own I/O beside kopf's watches.

It reuses kopf's credentials (``kopf.ConnectionInfo``: kubeconfig or service account), speaks
server-side apply with a field manager, and turns HTTP failures into typed ``ApiError``s so
that one adapter (``handlers/errors.py``) maps them to retry-or-fail.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import kopf

from kubeloop import GROUP, VERSION

Body = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """Where a resource lives in the API."""

    group: str
    version: str
    plural: str

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        parts = [base]
        if namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


MODEL_VERSIONS = Kind(GROUP, VERSION, "modelversions")
TRAINING_RUNS = Kind(GROUP, VERSION, "trainingruns")
MODEL_DEPLOYMENTS = Kind(GROUP, VERSION, "modeldeployments")
DRIFT_POLICIES = Kind(GROUP, VERSION, "driftpolicies")
PVCS = Kind("", "v1", "persistentvolumeclaims")
RESOURCE_QUOTAS = Kind("", "v1", "resourcequotas")
NAMESPACES = Kind("", "v1", "namespaces")
CONFIGMAPS = Kind("", "v1", "configmaps")
EVENTS = Kind("", "v1", "events")
# Local control plane only: the operator registers its own webhook (the chart ships it).
WEBHOOK_CONFIGURATIONS = Kind(
    "admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations"
)


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.status in (404, 409, 429) or self.status >= 500


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


PatchType = Literal["merge", "json", "strategic"]
_CONTENT_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ctx = ssl.create_default_context(
        cafile=os.fsdecode(info.ca_path) if info.ca_path else None,
        cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data,
    )
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data or info.private_key_data:
        # ssl can only load client certificates from files.
        tmp = tempfile.mkdtemp(prefix="kubeloop-tls-")
        if info.certificate_data:
            cert = os.path.join(tmp, "tls.crt")
            _write_secret(cert, info.certificate_data)
        if info.private_key_data:
            key = os.path.join(tmp, "tls.key")
            _write_secret(key, info.private_key_data)
    if cert:
        ctx.load_cert_chain(os.fsdecode(cert), os.fsdecode(key) if key else None)
    return ctx


def _write_secret(path: str, data: str | bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def connection_info() -> kopf.ConnectionInfo:
    """Credentials the way kopf finds them: in-cluster service account, else kubeconfig."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig found")
    return info


class KubeClient:
    """Async client for the few verbs the operator needs."""

    def __init__(
        self, info: kopf.ConnectionInfo, *, field_manager: str = "kubeloop", timeout: float = 30.0
    ) -> None:
        self._server = info.server.rstrip("/")
        self._headers = {"Accept": "application/json", **info.as_http_headers()}
        self._ssl = _ssl_context(info)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.field_manager = field_manager

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Body:
        url = self._server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else None
        async with self._client().request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            # An unknown resource type (e.g. KServe's CRD not installed) answers plain text.
            json_body = text and resp.content_type == "application/json"
            payload: Body = json.loads(text) if json_body else {}
            if resp.status >= 400:
                raise _error(resp.status, payload, text)
            return payload

    async def get(self, kind: Kind, namespace: str | None, name: str) -> Body:
        return await self.request("GET", kind.path(namespace, name))

    async def list(
        self, kind: Kind, namespace: str | None = None, *, label_selector: str | None = None
    ) -> list[Body]:
        params = {"labelSelector": label_selector} if label_selector else None
        items: list[Body] = (await self.request("GET", kind.path(namespace), params=params)).get(
            "items", []
        )
        return items

    async def watch(
        self,
        kind: Kind,
        namespace: str | None,
        *,
        resource_version: str = "",
        timeout_seconds: int = 300,
    ) -> AsyncIterator[tuple[str, Body]]:
        """Stream (event type, object) pairs until the server closes the watch."""
        params = {
            "watch": "1",
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "false",
        }
        if resource_version:
            params["resourceVersion"] = resource_version
        url = self._server + kind.path(namespace) + "?" + urllib.parse.urlencode(params)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        async with self._client().get(url, timeout=timeout) as resp:
            if resp.status >= 400:
                text = await resp.text()
                raise _error(resp.status, json.loads(text) if text else {}, text)
            async for line in resp.content:
                if line.strip():
                    event = json.loads(line)
                    yield event["type"], event["object"]

    async def create(self, kind: Kind, namespace: str | None, body: Body) -> Body:
        return await self.request("POST", kind.path(namespace), body=body)

    async def apply(
        self,
        kind: Kind,
        namespace: str | None,
        body: Body,
        *,
        subresource: str | None = None,
        force: bool = True,
    ) -> Body:
        """Server-side apply: idempotent create-or-update owned by our field manager."""
        name = body["metadata"]["name"]
        params = {"fieldManager": self.field_manager, "force": "true" if force else "false"}
        return await self.request(
            "PATCH",
            kind.path(namespace, name, subresource),
            params=params,
            body=body,
            content_type="application/apply-patch+yaml",
        )

    async def patch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        patch_type: PatchType = "merge",
        subresource: str | None = None,
    ) -> Body:
        return await self.request(
            "PATCH",
            kind.path(namespace, name, subresource),
            params={"fieldManager": self.field_manager},
            body=patch,
            content_type=_CONTENT_TYPES[patch_type],
        )

    async def delete(self, kind: Kind, namespace: str | None, name: str) -> None:
        try:
            await self.request(
                "DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"}
            )
        except NotFound:
            return


def _error(status: int, payload: Body, text: str) -> ApiError:
    reason = str(payload.get("reason", "")) or "Error"
    message = str(payload.get("message", "")) or text[:500]
    cls = NotFound if status == 404 else Conflict if status == 409 else ApiError
    return cls(status, reason, message)
