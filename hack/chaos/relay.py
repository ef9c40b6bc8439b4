"""A fixed address for a server that may come back elsewhere: a TCP relay, as a Kubernetes
Service is for a pod.

The operator reads Prometheus at one URL for its whole life (``KUBELOOP_PROMETHEUS_URL``), while
``hack/prometheus.py`` may start a stopped Prometheus on another port (it keeps the port only
when it can bind it again, and a port that just closed lingers in TIME_WAIT). The relay listens
on a port of its own and forwards each connection to wherever the server listens now; while the
server is down, a connection is accepted and closed at once, which the client sees as the
server being unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpRelay:
    def __init__(self, upstream_port: Callable[[], int]) -> None:
        self.upstream_port = upstream_port
        self.port = _free_port()
        self.refused = 0  # connections closed because the server was down
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-relay", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpRelay:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the relay did not start within 10s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stopping.wait()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port())
        except OSError:
            self.refused += 1
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
