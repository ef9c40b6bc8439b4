"""The faults a chaos run injects besides the proxy's: the control plane's API server and etcd
restarted, Prometheus stopped and started, the operator and a model server SIGKILLed.

Every fault is recorded with when it began and ended (epoch seconds), so the invariants can
ask what happened during it. The blocking ones (a control-plane start waits on /readyz) run in
a worker thread, never on the driver's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hack import prometheus as prometheus_mod
from hack.cluster import cluster as cluster_mod


@dataclass
class Fault:
    kind: str  # operator-kill, kube-apiserver, etcd, prometheus, model-server, silence, ...
    start: float
    end: float = 0.0
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "detail": self.detail,
        }


@dataclass
class FaultLog:
    faults: list[Fault] = field(default_factory=list)

    def begin(self, kind: str, detail: str = "") -> Fault:
        fault = Fault(kind, time.time(), detail=detail)
        self.faults.append(fault)
        return fault

    def of(self, kind: str) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind]


class ControlPlane:
    """Restarts of the local control plane's components (same flags, ports and data)."""

    def __init__(self, state_dir: Path, log: FaultLog) -> None:
        self.state_dir, self.log = state_dir, log
        self.lock = asyncio.Lock()  # one restart at a time

    async def restart(self, component: str, *, down_s: float) -> Fault:
        async with self.lock:
            fault = self.log.begin(component, f"SIGKILL, down {down_s:g}s")
            await asyncio.to_thread(cluster_mod.stop_component, self.state_dir, component)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(cluster_mod.up, self.state_dir)
            fault.end = time.time()
            return fault


class PrometheusControl:
    """Stops and starts the run's Prometheus (its data and port stay)."""

    def __init__(self, prom: prometheus_mod.Prom, scrape_interval: str, log: FaultLog) -> None:
        self.prom, self.scrape_interval, self.log = prom, scrape_interval, log

    async def outage(self, seconds: float, detail: str = "") -> Fault:
        fault = self.log.begin("prometheus", detail or f"stopped {seconds:g}s")
        await asyncio.to_thread(prometheus_mod.down, self.prom.state_dir)
        fault.start = time.time()  # down from here (SIGTERM takes a moment)
        await asyncio.sleep(seconds)
        self.prom = await asyncio.to_thread(
            prometheus_mod.up,
            self.prom.state_dir,
            targets_dir=self.prom.targets_dir,
            scrape_interval=self.scrape_interval,
        )
        fault.end = time.time()
        return fault


class OperatorSupervisor:
    """Keeps the operator running as a kubelet would: started again right after each kill we
    make; an exit nobody caused is recorded as a crash and restarted after a back-off."""

    def __init__(self, launch: Callable[[], subprocess.Popen[bytes]], log: FaultLog) -> None:
        self.launch, self.log = launch, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashes: list[dict[str, Any]] = []
        self.starts = 0
        self.started_at: list[float] = []
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self.proc = self.launch()
        self.starts += 1
        self.started_at.append(time.time())

    async def kill(self, detail: str = "") -> Fault:
        async with self._lock:
            fault = self.log.begin("operator-kill", detail)
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)  # no graceful shutdown: mid-work
            await asyncio.to_thread(self.proc.wait, 10)
            self.start()
            fault.end = time.time()
            return fault

    async def supervise(self, stop: asyncio.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            async with self._lock:
                proc = self.proc
                if stop.is_set() or proc is None or proc.poll() is None:
                    continue
                self.crashes.append({"t": time.time(), "returncode": proc.returncode})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self.start()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def model_server(state_dir: Path, namespace: str, deployment: str, version: str) -> dict[str, Any]:
    """The local serving backend's record of a server ({"pid", "port", "uri"}; {} if none)."""
    path = state_dir / "serving" / namespace / deployment / "servers" / f"{version}.json"
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record


def kill_model_server(
    state_dir: Path, namespace: str, deployment: str, version: str, log: FaultLog
) -> Fault | None:
    """SIGKILL the server of ``version`` (its whole session: it is a session leader)."""
    pid = int(model_server(state_dir, namespace, deployment, version).get("pid") or 0)
    if not pid:
        return None
    fault = log.begin("model-server", f"{deployment}/{version} pid {pid}")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    fault.end = time.time()
    return fault
