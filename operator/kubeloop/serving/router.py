"""The local backend's traffic splitter: a small reverse proxy in front of the stable and the
canary model servers that sends each request to one of them with the configured weight.

    python -m kubeloop.serving.router --port 8000 --weights /path/weights.json

``weights.json`` ({"stable": PORT, "canary": PORT | null, "canary_weight": 0..100}) is written
by the operator and re-read whenever it changes, so a step or a rollback takes effect on the
next request without restarting anything. Requests really reach both servers, so Prometheus
sees real canary traffic.

Feedback follows its prediction: the router remembers which server answered each request id
(the ``X-Request-Id`` every answer carries; the last ``REMEMBERED`` ids) and sends a label for
that id there, splitting a feedback batch whose ids were answered by different servers and
merging the answers in the batch's order. A label for an id it does not remember goes where the
weights send it (the server then answers ``unknown`` or ``late`` as it would).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}
REMEMBERED: Final = 200_000  # request ids whose server is remembered for their feedback


class Answered:
    """Which upstream port answered each recent request id (bounded, oldest forgotten)."""

    def __init__(self, capacity: int = REMEMBERED) -> None:
        self.capacity = capacity
        self._ports: OrderedDict[str, int] = OrderedDict()

    def remember(self, request_id: str, port: int) -> None:
        self._ports[request_id] = port
        self._ports.move_to_end(request_id)
        while len(self._ports) > self.capacity:
            self._ports.popitem(last=False)

    def port(self, request_id: object) -> int | None:
        return self._ports.get(request_id) if isinstance(request_id, str) else None


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


def merge_batches(answers: list[tuple[list[int], int, Any]], size: int) -> dict[str, Any]:
    """One feedback batch answer from the answers of its parts: (the positions each part
    held in the batch, its HTTP status, its JSON answer)."""
    results: list[Any] = [None] * size
    counts: dict[str, int] = {}
    for positions, status, answer in answers:
        for position, result in zip(positions, answer.get("results") or [], strict=False):
            results[position] = {**result, "index": position}
        for outcome, n in (answer.get("counts") or {}).items():
            counts[outcome] = counts.get(outcome, 0) + int(n)
        if status != 200:  # the whole part was refused: its items carry the answer
            for position in positions:
                results[position] = results[position] or {"index": position, **answer}
    return {"results": results, "counts": counts}


def build_app(weights: WeightsFile) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    session: dict[str, aiohttp.ClientSession] = {}
    answered = Answered()

    async def start(_: web.Application) -> None:
        session["client"] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60), connector=aiohttp.TCPConnector(limit=256)
        )

    async def stop(_: web.Application) -> None:
        await session["client"].close()

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"weights": weights.current().__dict__})

    async def forward(
        request: web.Request, port: int, body: bytes
    ) -> tuple[int, bytes, dict[str, str]]:
        url = f"http://127.0.0.1:{port}{request.rel_url}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with session["client"].request(
            request.method, url, data=body, headers=headers
        ) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            return upstream.status, payload, out

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "POST" and request.path.endswith("feedback"):
            return await feedback(request, body)
        port = weights.current().pick(random.random())  # a traffic split, not cryptography
        try:
            status, payload, headers = await forward(request, port, body)
        except aiohttp.ClientError as exc:
            return web.json_response({"error": f"upstream 127.0.0.1:{port}: {exc}"}, status=502)
        rid = next((v for k, v in headers.items() if k.lower() == "x-request-id"), None)
        if rid:
            answered.remember(rid, port)
        return web.Response(status=status, body=payload, headers=headers)

    async def feedback(request: web.Request, body: bytes) -> web.StreamResponse:
        """Labels to the server that answered their request id (see the module docstring)."""
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = None
        items = parsed if isinstance(parsed, list) else [parsed]
        default = weights.current().pick(random.random())
        ports = [
            answered.port(i.get("id") if isinstance(i, dict) else None) or default for i in items
        ]
        try:
            if len(set(ports)) == 1 or not isinstance(parsed, list):
                status, payload, headers = await forward(request, ports[0], body)
                return web.Response(status=status, body=payload, headers=headers)
            return web.json_response(await split_batch(request, items, ports))
        except aiohttp.ClientError as exc:
            return web.json_response({"error": f"upstream: {exc}"}, status=502)

    async def split_batch(request: web.Request, items: list[Any], ports: list[int]) -> Any:
        answers = []
        for port in sorted(set(ports)):
            mine = [i for i, p in enumerate(ports) if p == port]
            status, payload, _ = await forward(
                request, port, json.dumps([items[i] for i in mine]).encode()
            )
            answers.append((mine, status, json.loads(payload) if payload else {}))
        return merge_batches(answers, len(items))

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
