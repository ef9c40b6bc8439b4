"""The local backend's traffic splitter: a small reverse proxy in front of the stable and the
canary model servers that sends each request to one of them with the configured weight.

    python -m kubeloop.serving.router --port 8000 --weights /path/weights.json

``weights.json`` ({"stable": PORT, "canary": PORT | null, "canary_weight": 0..100}) is written
by the operator and re-read whenever it changes, so a step or a rollback takes effect on the
next request without restarting anything. Requests really reach both servers, so Prometheus
sees real canary traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


@dataclass(frozen=True)
class Weights:
    stable: int
    canary: int | None
    canary_weight: int

    def pick(self, draw: float) -> int:
        """The upstream port for a uniform draw in [0, 1)."""
        if self.canary is not None and draw * 100 < self.canary_weight:
            return self.canary
        return self.stable


class WeightsFile:
    """Re-reads the weights file when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = -1.0
        self._weights = Weights(0, None, 0)

    def current(self) -> Weights:
        mtime = os.stat(self.path).st_mtime
        if mtime != self._mtime:
            data = json.loads(self.path.read_text())
            self._weights = Weights(
                int(data["stable"]), data.get("canary"), int(data.get("canary_weight", 0))
            )
            self._mtime = mtime
        return self._weights


def build_app(weights: WeightsFile) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    session: dict[str, aiohttp.ClientSession] = {}

    async def start(_: web.Application) -> None:
        session["client"] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60), connector=aiohttp.TCPConnector(limit=256)
        )

    async def stop(_: web.Application) -> None:
        await session["client"].close()

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"weights": weights.current().__dict__})

    async def proxy(request: web.Request) -> web.StreamResponse:
        port = weights.current().pick(random.random())  # a traffic split, not cryptography
        url = f"http://127.0.0.1:{port}{request.rel_url}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        try:
            async with session["client"].request(
                request.method, url, data=body, headers=headers
            ) as upstream:
                payload = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
                return web.Response(status=upstream.status, body=payload, headers=out)
        except aiohttp.ClientError as exc:
            return web.json_response({"error": f"upstream 127.0.0.1:{port}: {exc}"}, status=502)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/router/health", health)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kubeloop's local canary traffic splitter")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    args = parser.parse_args(argv)
    web.run_app(
        build_app(WeightsFile(args.weights)),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
