"""What a chaos run works in: its configuration, its directories, the clients and fault tools it
holds, what it expects of every object it created, and the driver's own API helpers.

The driver talks to the API server directly with the cluster's admin credentials (only the
operator goes through the fault proxy), and rides out the control-plane restarts it causes
itself: every call is retried while the API server is down, and a create that answers
AlreadyExists after a retry is a create that had already happened.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kopf

from hack.chaos.faults import (
    ControlPlane,
    FaultLog,
    OperatorSupervisor,
    PrometheusControl,
)
from hack.chaos.invariants import Expected, Rollback
from hack.chaos.proxy import FaultProxy
from hack.chaos.record import KINDS, Recorder
from hack.chaos.relay import TcpRelay
from hack.cluster import cluster as cluster_mod
from kubeloop.backends.kube import ApiError, Conflict, KubeClient, NotFound

T = TypeVar("T")
RETRY_S = 1.0


@dataclass(frozen=True)
class ChaosConfig:
    """How big a run is and which faults it injects when. Times are seconds from the operator's
    first start (the fault window)."""

    work_dir: Path
    cluster_dir: Path
    seed: int = 1
    objects: int = 1000  # objects of the four kinds the driver creates
    training_runs: int = 4  # tiny built-in-dataset runs that succeed (plus one with bad input)
    respec_training: bool = True  # change one run's spec while it runs: a second attempt
    canaries: int = 2  # deployments that roll a broken canary back, then promote a good one
    drift_loop: bool = True  # the closed loop: a DriftPolicy that retrains and canaries
    notify_policies: int = 1  # DriftPolicies (mode notify) watching the first canary
    kills: int = 24  # operator SIGKILLs, at seeded moments of the fault window
    kill_gap_s: float = 10.0  # at least this long between two kills (the operator must start)
    api_restarts: int = 2
    etcd_restarts: int = 1
    restart_down_s: float = 8.0
    prometheus_outage_s: float = 150.0  # during the first canary's second step
    silence_s: float = 30.0  # watch streams silent, during one wave of ModelVersions
    conflict_rate: float = 0.05  # of the operator's writes answered 409
    # One 409 each on a ModelVersion's first status write and on the write that removes a
    # deleted deployment's finalizer: deterministic reproductions beside the seeded 409s.
    probe_conflict: bool = True
    fault_window_s: float = 600.0
    waves: int = 8  # ModelVersions are created in this many waves over the window
    settle_s: float = 300.0  # the longest the run waits for convergence once faults stop
    stall_s: float = 60.0  # stop waiting once nothing converged for this long
    delete_within_s: float = 120.0
    canary_interval: str = "4s"
    timeouts_scale: float = 1.0  # stretch every wait (slow machines)

    def scaled(self, seconds: float) -> float:
        return seconds * self.timeouts_scale


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.status in {409, 429} or exc.status >= 500
    return isinstance(exc, aiohttp.ClientError | OSError | TimeoutError)


@dataclass
class World:
    cfg: ChaosConfig
    log: Callable[[str], None] = print
    namespace: str = field(default_factory=lambda: f"chaos-{uuid.uuid4().hex[:6]}")
    expected: dict[tuple[str, str], Expected] = field(default_factory=dict)
    faults: FaultLog = field(default_factory=FaultLog)
    rollbacks: list[Rollback] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # epoch seconds of the operator's first start

    def __post_init__(self) -> None:
        self.rng = random.Random(self.cfg.seed)
        work = self.cfg.work_dir
        self.artifact_root = work / "artifacts"
        self.state_dir = work / "state"
        self.models_dir = work / "models"
        self.operator_log = work / "operator.log"
        # Set by the scenario's setup.
        self.cluster: cluster_mod.Cluster | None = None
        self.kube: KubeClient | None = None
        self.proxy: FaultProxy | None = None
        self.prometheus: PrometheusControl | None = None
        self.control_plane: ControlPlane | None = None
        self.operator: OperatorSupervisor | None = None
        self.recorder: Recorder | None = None
        self.relay: TcpRelay | None = None

    # --- the clients -------------------------------------------------------------------------

    def admin_connection(self, cluster: cluster_mod.Cluster) -> kopf.ConnectionInfo:
        pki = cluster.state_dir / "pki"
        return kopf.ConnectionInfo(
            server=cluster.server,
            ca_path=str(pki / "ca.crt"),
            certificate_path=str(pki / "admin.crt"),
            private_key_path=str(pki / "admin.key"),
        )

    @property
    def api(self) -> KubeClient:
        assert self.kube is not None, "the scenario's setup makes the client"
        return self.kube

    def elapsed(self) -> float:
        return time.time() - self.started if self.started else 0.0

    # --- the driver's calls, riding out restarts ------------------------------------------------

    async def persist(
        self,
        action: Callable[[], Awaitable[T]],
        what: str,
        *,
        within: float = 180,
        also: tuple[type[Exception], ...] = (),
    ) -> T | None:
        """``action``, retried while the API server is unavailable (and on ``also``, e.g. a
        kubectl that could not connect); None for a create that had already happened
        (AlreadyExists)."""
        deadline = time.monotonic() + self.cfg.scaled(within)
        while True:
            try:
                return await action()
            except Conflict as exc:
                if exc.reason == "AlreadyExists":
                    return None
                if time.monotonic() > deadline:
                    raise
            except Exception as exc:
                if not (retryable(exc) or isinstance(exc, also)) or time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: {exc!r}") from exc
            await asyncio.sleep(RETRY_S)

    async def create(self, kind: str, body: dict[str, Any], expected: Expected) -> None:
        self.expected[expected.key] = expected
        await self.persist(
            lambda: self.api.create(KINDS[kind], self.namespace, body), f"create {kind}"
        )

    async def patch(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        await self.persist(
            lambda: self.api.patch(KINDS[kind], self.namespace, name, patch),
            f"patch {kind}/{name}",
        )

    async def delete(self, kind: str, name: str) -> None:
        await self.persist(
            lambda: self.api.delete(KINDS[kind], self.namespace, name), f"delete {kind}/{name}"
        )

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        async def read() -> dict[str, Any] | None:
            try:
                return await self.api.get(KINDS[kind], self.namespace, name)
            except NotFound:
                return None

        return await self.persist(read, f"get {kind}/{name}")

    async def status(self, kind: str, name: str) -> dict[str, Any]:
        body = await self.get(kind, name)
        return dict((body or {}).get("status") or {})

    async def items(self, kind: str) -> list[dict[str, Any]]:
        found = await self.persist(
            lambda: self.api.list(KINDS[kind], self.namespace), f"list {kind}"
        )
        return list(found or [])

    async def until(
        self,
        probe: Callable[[], Awaitable[T | None]],
        *,
        within: float,
        what: str,
        every: float = 0.5,
    ) -> T:
        """Poll ``probe`` until it returns something truthy (errors count as not yet)."""
        deadline = time.monotonic() + self.cfg.scaled(within)
        last: object = None
        while time.monotonic() < deadline:
            try:
                value = await probe()
            except Exception as exc:
                value, last = None, exc
            if value:
                return value
            await asyncio.sleep(every)
        raise TimeoutError(f"{what}: not within {within:.0f}s (last error: {last!r})")

    def expect(self, expected: Expected) -> None:
        self.expected[expected.key] = expected

    def schedule(
        self,
        count: int,
        *,
        start: float,
        end: float,
        gap: float,
        avoid: list[tuple[float, float]] | None = None,
    ) -> list[float]:
        """``count`` seeded moments in [start, end] at least ``gap`` apart and outside the
        ``avoid`` intervals (offsets from the fault window's start)."""
        taken: list[float] = []
        for _ in range(count * 200):
            if len(taken) == count:
                break
            t = self.rng.uniform(start, end)
            if all(abs(t - o) >= gap for o in taken) and not any(
                a <= t <= b for a, b in avoid or []
            ):
                taken.append(t)
        if len(taken) < count:
            raise ValueError(
                f"cannot place {count} moments {gap:g}s apart in [{start:g}, {end:g}]s: "
                "widen the fault window"
            )
        return sorted(taken)

    async def at(self, offset: float) -> None:
        """Sleep until ``offset`` seconds into the fault window."""
        await asyncio.sleep(max(0.0, self.started + offset - time.time()))


def short_config(work_dir: Path, cluster_dir: Path, seed: int = 7) -> ChaosConfig:
    """The run inside ``make test``: the same faults with smaller numbers (about 3 minutes on
    two cores): ~150 ModelVersions, a TrainingRun (and one with bad input), one canary with the
    Prometheus outage and the model-server kill, a notify policy, 5 operator kills (and one
    during deletion), one API server restart, 409s, a silent watch."""
    return ChaosConfig(
        work_dir=work_dir,
        cluster_dir=cluster_dir,
        seed=seed,
        objects=160,
        training_runs=1,
        respec_training=False,
        canaries=1,
        drift_loop=False,
        notify_policies=1,
        kills=5,
        kill_gap_s=8.0,
        api_restarts=1,
        etcd_restarts=0,
        restart_down_s=3.0,
        prometheus_outage_s=12.0,
        silence_s=8.0,
        fault_window_s=65.0,
        waves=5,
        settle_s=90.0,
        stall_s=20.0,
        canary_interval="3s",
        delete_within_s=60.0,
    )
