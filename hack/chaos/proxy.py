"""A fault-injecting HTTPS reverse proxy in front of the kube-apiserver.

Only the operator talks through it: it gets a kubeconfig naming the proxy (``write_kubeconfig``),
whose own self-signed certificate it trusts; the proxy forwards every request with the local
cluster's admin client certificate. Two faults, both switchable while it runs:

- **conflicts**: a seeded fraction of writes (POST/PUT/PATCH of objects; reviews and token
  requests are queries, not writes) is answered ``409 Conflict`` without reaching the server,
  with the Status body the API server sends for a stale resourceVersion;
- **silence**: for a while, every watch stream stays open but forwards nothing (the events are
  withheld, as from a stuck connection or a wedged server); when the silence ends, each stream
  that withheld events is closed, so the client watches again from the last resourceVersion it
  saw (and receives the withheld events then), as it would once a dead TCP connection is noticed.

When the API server itself is down, requests are answered ``503`` (what a load balancer in front
of it says) and open watches end. The proxy runs its own event loop in a thread, so a blocking
driver (a control-plane restart waits on /readyz) never stalls the operator's traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kubeloop.backends.webhook_certs import TlsFiles, self_signed

HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "host",
        "content-length",
        "authorization",
        "accept-encoding",
        "content-encoding",
        "upgrade",
    }
)
WRITES = frozenset({"POST", "PUT", "PATCH"})
# POSTs that ask a question rather than write an object.
NOT_WRITES = ("accessreviews", "tokenreviews", "selfsubjectreviews", "selfsubjectrulesreviews")
SILENCE_POLL_S = 0.25


@dataclass(frozen=True)
class Upstream:
    """The API server and the client credentials the proxy forwards with."""

    server: str
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of_local_cluster(cls, server: str, state_dir: Path) -> Upstream:
        pki = state_dir / "pki"
        return cls(server, pki / "ca.crt", pki / "admin.crt", pki / "admin.key")

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass
class ProxyStats:
    """What the proxy did; read with ``FaultProxy.stats()`` (a copy)."""

    requests: int = 0
    writes: int = 0
    conflicts: Counter[str] = field(default_factory=Counter)  # "PATCH modelversions/status"
    unavailable: int = 0  # answered 503: the API server was down
    watches: int = 0
    withheld_events: int = 0
    cut_streams: int = 0
    silences: list[tuple[float, float]] = field(default_factory=list)  # (start, end), epoch s
    refused: list[tuple[float, str, str]] = field(default_factory=list)  # (t, method, path)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "writes": self.writes,
            "conflicts_injected": sum(self.conflicts.values()),
            "conflicts_by_target": dict(self.conflicts.most_common()),
            "unavailable_answers": self.unavailable,
            "watches_opened": self.watches,
            "withheld_events": self.withheld_events,
            "cut_streams": self.cut_streams,
            "silences": [list(s) for s in self.silences],
            "refused": sorted({f"{method} {path}" for _, method, path in self.refused}),
        }


def _target(path: str, method: str) -> str:
    """``modelversions`` or ``modelversions/status`` from an API path (for the stats)."""
    parts = [p for p in path.split("/") if p]
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2 :]
    else:
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    plural = rest[0] if rest else "?"
    sub = f"/{rest[2]}" if len(rest) > 2 else ""
    return f"{method} {plural}{sub}"


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultProxy:
    """The proxy; ``start()`` it, hand ``write_kubeconfig()`` to the operator, ``stop()`` it."""

    def __init__(
        self, upstream: Upstream, tls_dir: Path, *, seed: int, conflict_rate: float = 0.0
    ) -> None:
        self.upstream = upstream
        self.tls: TlsFiles = self_signed(tls_dir)
        self.port = _free_port()
        self.conflict_rate = conflict_rate
        self._random = random.Random(seed)
        self._silent_until = 0.0
        self._refusals: list[list[Any]] = []  # [path fragment, body fragment, writes left]
        self._stats = ProxyStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # --- control (any thread) ----------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._main, name="chaos-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the chaos proxy did not start within 30s")
        return self

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(15)

    def set_conflict_rate(self, rate: float) -> None:
        self.conflict_rate = rate

    def refuse_first(self, path_fragment: str, count: int = 1, *, body_fragment: str = "") -> None:
        """Answer 409 to the next ``count`` writes whose path contains ``path_fragment`` (and
        whose body contains ``body_fragment``): a deterministic conflict, beside the seeded
        ones."""
        with self._lock:
            self._refusals.append([path_fragment, body_fragment.encode(), count])

    def silence(self, seconds: float) -> None:
        """Withhold every watch event for ``seconds`` from now."""
        now = time.time()
        self._silent_until = now + seconds
        with self._lock:
            self._stats.silences.append((now, now + seconds))

    def silent(self) -> bool:
        return time.time() < self._silent_until

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                self._stats.requests,
                self._stats.writes,
                Counter(self._stats.conflicts),
                self._stats.unavailable,
                self._stats.watches,
                self._stats.withheld_events,
                self._stats.cut_streams,
                list(self._stats.silences),
                list(self._stats.refused),
            )

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig that points at the proxy (trusting its certificate). The token is not
        checked: the proxy authenticates upstream with the admin certificate."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "chaos",
            "clusters": [
                {
                    "name": "chaos",
                    "cluster": {"server": self.url, "certificate-authority": str(self.tls.ca)},
                }
            ],
            "users": [{"name": "operator", "user": {"token": "via-the-chaos-proxy"}}],
            "contexts": [
                {
                    "name": "chaos",
                    "context": {"cluster": "chaos", "user": "operator", "namespace": namespace},
                }
            ],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2))
        return path

    # --- the proxy's own thread ----------------------------------------------------------------

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.upstream.ssl_context(), limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=server_ssl)
        await site.start()
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def _draw_conflict(self, request: web.Request, body: bytes) -> bool:
        if request.method not in WRITES or any(q in request.path for q in NOT_WRITES):
            return False
        with self._lock:
            self._stats.writes += 1
            for rule in self._refusals:
                if rule[2] > 0 and rule[0] in request.path and rule[1] in body:
                    rule[2] -= 1
                    return True
        return self.conflict_rate > 0 and self._random.random() < self.conflict_rate

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._stats.requests += 1
        body = await request.read()
        if self._draw_conflict(request, body):
            target = _target(request.path, request.method)
            with self._lock:
                self._stats.conflicts[target] += 1
                self._stats.refused.append((time.time(), request.method, request.path))
            parts = request.path.rstrip("/").split("/")
            name = parts[-2] if parts[-1] in ("status", "scale") else parts[-1]
            return _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {target.split()[1]} "{name}": the object has '
                "been modified; please apply your changes to the latest version and try again "
                "(injected by the chaos proxy)",
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        # Uncompressed from the API server: watch lines are read one by one, and the answer
        # goes back as it came (the API server gzips large lists for clients that accept it).
        headers["Accept-Encoding"] = "identity"
        watch = request.query.get("watch", "") in ("1", "true") or "/watch/" in request.path
        assert self._session is not None
        url = self.upstream.server + str(request.rel_url)
        timeout = aiohttp.ClientTimeout(total=None if watch else 120, sock_connect=5)
        try:
            upstream = await self._session.request(
                request.method, url, data=body or None, headers=headers, timeout=timeout
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            with self._lock:
                self._stats.unavailable += 1
            return _status(503, "ServiceUnavailable", f"chaos proxy: API server unreachable: {exc}")
        try:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            if watch and upstream.status == 200:
                return await self._stream(request, upstream, out)
            try:
                payload = await upstream.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                with self._lock:
                    self._stats.unavailable += 1
                return _status(503, "ServiceUnavailable", f"chaos proxy: answer cut: {exc}")
            return web.Response(status=upstream.status, body=payload, headers=out)
        finally:
            upstream.release()

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Forward a watch line by line, withholding lines while silent (see module doc)."""
        with self._lock:
            self._stats.watches += 1
        response = web.StreamResponse(status=upstream.status, headers=headers)
        try:
            await response.prepare(request)
        except (aiohttp.ClientError, OSError):
            return response  # the client left before the answer began
        withheld = 0
        pending: asyncio.Future[bytes] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(upstream.content.readline())
                done, _ = await asyncio.wait({pending}, timeout=SILENCE_POLL_S)
                silent = self.silent()
                if withheld and not silent:
                    with self._lock:
                        self._stats.cut_streams += 1
                    break  # the client watches again from the last resourceVersion it saw
                if not done:
                    continue
                line, pending = pending.result(), None
                if not line:
                    break  # the server ended the watch (timeout, or it went down)
                if silent:
                    withheld += 1
                    with self._lock:
                        self._stats.withheld_events += 1
                    continue
                await response.write(line)
        except (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # either side went away: the watch ends
        finally:
            if pending is not None:
                pending.cancel()
        with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
            await response.write_eof()
        return response
