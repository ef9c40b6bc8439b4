"""Running the serving runtime: load the version, attach its recorders, serve the HTTP app
(``app.py``) on uvicorn with uvloop and, when asked, the V2 gRPC server (``grpc_server.py``)
on the same event loop; a SIGTERM drains (readiness turns 503) before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn
import uvloop

from kubeloop.serving import protocol
from kubeloop.serving.app import ServingApp
from kubeloop.serving.artifact import ArtifactError
from kubeloop.serving.predictor import Predictor, ServingOptions

logger = logging.getLogger("kubeloop.serving")


@dataclass(frozen=True)
class Launch:
    """What ``python -m kubeloop.serving`` serves, and where."""

    model_dir: Path
    model_name: str
    model_version: str
    options: ServingOptions
    http_port: int
    grpc_port: int | None = None
    host: str = "0.0.0.0"  # a pod's port, reached through its Service
    max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES
    max_batch_rows: int = protocol.DEFAULT_MAX_BATCH_ROWS


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT first drains the app (readiness turns
    503) and is not re-raised after shutdown: the gRPC server still has to stop and the
    recorders to flush."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def uvicorn_config(app: ServingApp, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        interface="asgi3",
        lifespan="off",
        access_log=False,
        log_config=None,
        proxy_headers=False,  # no X-Forwarded-* rewriting per request
        server_header=False,
        # Longer than the idle timeouts of the proxies in front (Knative's queue-proxy, an
        # ingress), so they never reuse a connection the runtime is closing (kserve: 65 s).
        timeout_keep_alive=65,
        timeout_graceful_shutdown=20,
    )


async def serve(app: ServingApp, launch: Launch) -> None:
    """Serve HTTP (and gRPC when ``launch.grpc_port`` is set) until SIGTERM/SIGINT."""
    server = _Server(
        uvicorn_config(app, launch.host, launch.http_port),
        on_exit=lambda: app.drain("The server is shutting down."),
    )
    grpc_server = None
    if launch.grpc_port is not None:
        from kubeloop.serving.grpc_server import start_grpc_server

        grpc_server = await start_grpc_server(
            app, host=launch.host, port=launch.grpc_port, max_message_bytes=app.max_body_bytes
        )
    loop = type(asyncio.get_running_loop())
    grpc_note = f", gRPC on :{launch.grpc_port}" if launch.grpc_port is not None else ""
    logger.info(
        "serving model %s version %s on http://%s:%d (loop %s.%s, http httptools%s)",
        app.signature.model,
        app.signature.version,
        launch.host,
        launch.http_port,
        loop.__module__,
        loop.__qualname__,
        grpc_note,
    )
    try:
        await server.serve()
    finally:
        app.drain("The server is shutting down.")
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        await app.predictor.close()


class OptionError(Exception):
    """A runtime option that can never work; the message names it."""


def load_predictor(
    name: str, version: str, model_dir: str | Path, options: ServingOptions
) -> Predictor:
    """The loaded version with its recorders attached; any failure to load is an
    ``ArtifactError`` (the unforeseen ones chained as its cause), options the recorders
    refuse an ``OptionError``."""
    from kubeloop.serving import recording

    try:
        predictor = Predictor.load(name, version, model_dir, options)
    except ArtifactError:
        raise
    except Exception as exc:  # torch raises many types for an artifact it cannot run
        raise ArtifactError(f"{type(exc).__name__}: {exc}") from exc
    try:
        recording.attach(predictor, options)
    except ValueError as exc:  # an option that can never work (the message names it)
        raise OptionError(str(exc)) from exc
    return predictor


async def _load_and_serve(launch: Launch) -> None:
    # In the running loop: a recorder may start its background task while it is attached.
    predictor = load_predictor(
        launch.model_name, launch.model_version, launch.model_dir, launch.options
    )
    app = ServingApp(
        predictor, max_body_bytes=launch.max_body_bytes, max_batch_rows=launch.max_batch_rows
    )
    await serve(app, launch)


def run(launch: Launch) -> None:
    """Load the artifact and serve it on uvloop (``ArtifactError`` when it cannot be loaded)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    # uvicorn only installs uvloop itself in Server.run(); serve() runs on the caller's loop
    # (which is why kserve's single-worker ModelServer runs on the stdlib loop): make it uvloop.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_load_and_serve(launch))
