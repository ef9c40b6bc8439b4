"""The local serving backend: model servers and a traffic splitter as local processes.

Each ModelDeployment gets a state directory ``<state_dir>/serving/<namespace>/<name>/`` with one
model server per served version (``python -m kubeloop.serving``), one router
(``python -m kubeloop.serving.router``) and the router's ``weights.json``. Every process is
started detached (its own session) and recorded by pid and port, so a restarted operator finds
and keeps them instead of starting them twice. The servers are registered for Prometheus
through a ``file_sd_configs`` file, labelled with their namespace and deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.backends.scrape_targets import remove_targets, write_targets
from kubeloop.planning.placement import (
    Placement,
    Served,
    ServingState,
    endpoint_path,
    runtime_options,
)


class LocalServingError(Exception):
    """The placement cannot be served locally (e.g. an artifact that is not on this disk)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int, marker: str) -> bool:
    """The process exists and is ours (pids are reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for _ in range(50):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def model_dir(served: Served) -> Path:
    if not served.uri.startswith("file://"):
        raise LocalServingError(
            f"the local backend serves file:// artifacts; {served.version} is at {served.uri} "
            "(use serving.backend: kserve for object stores)"
        )
    return Path(served.uri.removeprefix("file://"))


class LocalServingBackend:
    def __init__(self, state_dir: Path, targets_dir: Path, *, python: str = sys.executable) -> None:
        self.root = state_dir / "serving"
        self.targets_dir = targets_dir
        self.python = python

    def _dir(self, md: ModelDeployment) -> Path:
        return self.root / md.namespace / md.name

    @staticmethod
    def _key(md: ModelDeployment) -> str:
        return f"{md.namespace}--{md.name}"

    async def observe(self, md: ModelDeployment, placement: Placement) -> ServingState:
        ports, router = await asyncio.to_thread(self._running, md)
        stable = ports.get(placement.stable.version)
        stable_ready = stable is not None and await _ready(stable)
        canary = ports.get(placement.canary.version) if placement.canary else None
        canary_ready = canary is not None and await _ready(canary)
        url = (
            f"http://127.0.0.1:{router}{endpoint_path(md.spec.serving, md.name)}" if router else ""
        )
        return ServingState(stable_ready, canary_ready, url, self._crashes(md, placement))

    def _running(self, md: ModelDeployment) -> tuple[dict[str, int], int | None]:
        """Ports of the servers (by version) and of the router that are alive now."""
        folder = self._dir(md)
        ports: dict[str, int] = {}
        for state in (folder / "servers").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                known = json.loads(state.read_text())
                if _alive(known["pid"], f"--model-version {state.stem}"):
                    ports[state.stem] = int(known["port"])
        router: int | None = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            known = json.loads((folder / "router.json").read_text())
            if _alive(known["pid"], str(folder / "weights.json")):
                router = int(known["port"])
        return ports, router

    async def apply(self, md: ModelDeployment, placement: Placement) -> ServingState:
        ports = await asyncio.to_thread(self._ensure_servers, md, placement)
        stable_ready = await _ready(ports[placement.stable.version])
        canary_ready = placement.canary is not None and await _ready(
            ports[placement.canary.version]
        )
        router_port = await asyncio.to_thread(
            self._ensure_router, md, placement, ports, canary_ready
        )
        # Only once the router no longer sends them anything: stop versions not served now.
        await asyncio.to_thread(self._stop_unwanted, md, ports)
        url = f"http://127.0.0.1:{router_port}{endpoint_path(md.spec.serving, md.name)}"
        return ServingState(stable_ready, canary_ready, url, self._crashes(md, placement))

    def _crashes(self, md: ModelDeployment, placement: Placement) -> str:
        """Why a server that should run exited (its log's last line), or ''."""
        folder = self._dir(md) / "servers"
        served = [placement.stable] + ([placement.canary] if placement.canary else [])
        for s in served:
            crash = folder / f"{s.version}.crash"
            if crash.exists():
                return f"model server for {s.version} exited: {crash.read_text().strip()}"
        return ""

    def _ensure_servers(self, md: ModelDeployment, placement: Placement) -> dict[str, int]:
        folder = self._dir(md) / "servers"
        folder.mkdir(parents=True, exist_ok=True)
        wanted = [placement.stable] + ([placement.canary] if placement.canary else [])
        ports = {s.version: self._ensure_server(md, placement, s, folder) for s in wanted}
        write_targets(
            self.targets_dir,
            self._key(md),
            [
                (
                    f"127.0.0.1:{port}",
                    {
                        "namespace": md.namespace,
                        "deployment": md.name,
                        "role": "stable" if v == placement.stable.version else "canary",
                    },
                )
                for v, port in ports.items()
            ],
        )
        return ports

    def _stop_unwanted(self, md: ModelDeployment, ports: dict[str, int]) -> None:
        for state in (self._dir(md) / "servers").glob("*.json"):
            if state.stem not in ports:
                _stop(json.loads(state.read_text())["pid"])
                state.unlink()

    def _ensure_server(
        self, md: ModelDeployment, placement: Placement, served: Served, folder: Path
    ) -> int:
        state = folder / f"{served.version}.json"
        log_path = folder / f"{served.version}.log"
        crash = folder / f"{served.version}.crash"
        if state.exists():
            known = json.loads(state.read_text())
            if _alive(known["pid"], f"--model-version {served.version}"):
                crash.unlink(missing_ok=True)
                return int(known["port"])
            # It died (e.g. the artifact does not load): remember why, then start it again.
            lines = log_path.read_text(errors="replace").strip().splitlines()
            crash.write_text(lines[-1][:500] if lines else "no output")
        directory = model_dir(served)
        port = _free_port()
        serving = md.spec.serving
        args = [
            self.python,
            "-m",
            "kubeloop.serving",
            "--model-dir",
            str(directory),
            "--model-name",
            md.name,
            "--model-version",
            served.version,
            "--http-port",
            str(port),
        ]
        args += runtime_options(serving, placement)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _write_json(state, {"pid": proc.pid, "port": port, "uri": served.uri})
        return port

    def _ensure_router(
        self, md: ModelDeployment, placement: Placement, ports: dict[str, int], canary_ready: bool
    ) -> int:
        folder = self._dir(md)
        canary = placement.canary
        # A canary gets traffic only once it answers: clients never see it loading.
        weights = {
            "stable": ports[placement.stable.version],
            "canary": ports[canary.version] if canary and canary_ready else None,
            "canary_weight": placement.canary_weight if canary and canary_ready else 0,
        }
        weights_file = folder / "weights.json"
        if not weights_file.exists() or json.loads(weights_file.read_text()) != weights:
            _write_json(weights_file, weights)
        state = folder / "router.json"
        if state.exists():
            known = json.loads(state.read_text())
            if _alive(known["pid"], str(weights_file)):
                return int(known["port"])
        port = _free_port()
        with (folder / "router.log").open("ab") as log:
            proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "kubeloop.serving.router",
                    "--port",
                    str(port),
                    "--weights",
                    str(weights_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _write_json(state, {"pid": proc.pid, "port": port})
        return port

    def stop_all(self) -> None:
        """Stop every process this backend started (tests, the demo; not the operator, whose
        restart must find its servers running)."""
        for state in self.root.glob("*/*/**/*.json"):
            if state.name != "weights.json":
                _stop(json.loads(state.read_text())["pid"])
        # And any router that lost its record (its command line names our state directory).
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError, ValueError):
                if str(self.root).encode() in cmdline.read_bytes():
                    _stop(int(cmdline.parent.name))
        shutil.rmtree(self.root, ignore_errors=True)

    async def delete(self, md: ModelDeployment) -> None:
        await asyncio.to_thread(self._delete, md)

    def _delete(self, md: ModelDeployment) -> None:
        folder = self._dir(md)
        for state in [*folder.glob("servers/*.json"), folder / "router.json"]:
            if state.exists():
                _stop(json.loads(state.read_text())["pid"])
        remove_targets(self.targets_dir, self._key(md))
        shutil.rmtree(folder, ignore_errors=True)


async def _ready(port: int) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=2)
        async with (
            aiohttp.ClientSession(timeout=timeout) as client,
            client.get(f"http://127.0.0.1:{port}/v2/health/ready") as resp,
        ):
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
