"""What a chaos run saw while it ran, sampled from outside the operator.

The recorder polls, with the cluster's admin credentials (never through the fault proxy):

- the four kinds in the namespace: every condition transition (type, status, reason) with the
  time it was first seen, the rollouts' phases, steps and analysis records (kept here, since
  ``status.analysis`` keeps only the latest 64), and the retrains of the DriftPolicies;
- the local serving backend's state: each deployment's router ``weights.json`` and server
  records, whenever they change;
- the processes the run's operator started: model servers (by deployment and version), routers
  (by deployment) and local pipeline runners (by attempt directory) — how many of each are alive
  at once, and which pids each ever had.

Nothing here judges; ``invariants`` does, over these records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeloop.backends.kube import (
    DRIFT_POLICIES,
    MODEL_DEPLOYMENTS,
    MODEL_VERSIONS,
    TRAINING_RUNS,
    Kind,
    KubeClient,
)

KINDS: dict[str, Kind] = {
    "ModelVersion": MODEL_VERSIONS,
    "TrainingRun": TRAINING_RUNS,
    "ModelDeployment": MODEL_DEPLOYMENTS,
    "DriftPolicy": DRIFT_POLICIES,
}
SERVER_MODULE = "kubeloop.serving"
ROUTER_MODULE = "kubeloop.serving.router"
RUNNER_MODULE = "kubeloop_pipelines.local_runner"


@dataclass(frozen=True)
class ConditionSeen:
    t: float  # epoch seconds when first sampled
    kind: str
    name: str
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class AnalysisSeen:
    deployment: str
    canary: str  # the canary version being analysed when the record was first seen
    step: int
    check: str
    verdict: str
    time: str  # the record's own RFC 3339 stamp
    value: float | None


@dataclass(frozen=True)
class RolloutSeen:
    t: float
    deployment: str
    phase: str
    stable: str
    canary: str
    weight: int
    step: int
    history: tuple[tuple[str, str, str], ...]  # (toVersion, result, finishedAt)


@dataclass
class Processes:
    """Instances (sessions) of one key: a deployment's version, a router, an attempt directory."""

    pids: set[int] = field(default_factory=set)
    max_alive: int = 0
    alive: set[int] = field(default_factory=set)


def _args(cmdline: bytes) -> list[str]:
    return [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]


def _arg(args: list[str], flag: str) -> str:
    with contextlib.suppress(ValueError, IndexError):
        return args[args.index(flag) + 1]
    return ""


def classify_process(
    args: list[str], *, artifact_root: Path, serving_root: Path, training_root: Path
) -> tuple[str, str] | None:
    """("server", "<deployment>/<version>"), ("router", "<deployment dir>") or ("runner",
    "<attempt dir>") for a process of this run; None for any other process."""
    if len(args) < 3 or args[1] != "-m":
        return None
    module = args[2]
    if module == SERVER_MODULE and _arg(args, "--model-dir").startswith(str(artifact_root)):
        return "server", f"{_arg(args, '--model-name')}/{_arg(args, '--model-version')}"
    if module == ROUTER_MODULE and _arg(args, "--weights").startswith(str(serving_root)):
        return "router", str(Path(_arg(args, "--weights")).parent)
    if module == RUNNER_MODULE and _arg(args, "--state-dir").startswith(str(training_root)):
        return "runner", _arg(args, "--state-dir")
    return None


def _session(pid_dir: Path) -> int:
    """The session id of a process (``/proc/<pid>/stat`` field 6): the backends start every
    server, router and runner in a session of its own, so a second session for one key is a
    second instance, while processes it forks share its session."""
    fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[3])


def scan_processes(
    *, artifact_root: Path, serving_root: Path, training_root: Path
) -> dict[tuple[str, str], set[int]]:
    """This run's live servers, routers and runners by (role, key): their session ids."""
    found: dict[tuple[str, str], set[int]] = defaultdict(set)
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = _args(entry.read_bytes())
            role = classify_process(
                args,
                artifact_root=artifact_root,
                serving_root=serving_root,
                training_root=training_root,
            )
            if role is not None:
                found[role].add(_session(entry.parent))
        except (OSError, ValueError, IndexError):
            continue  # it exited while we looked
    return found


def _summary(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    meta, status = body["metadata"], body.get("status") or {}
    return {
        "uid": meta.get("uid", ""),
        "generation": meta.get("generation"),
        "observedGeneration": status.get("observedGeneration"),
        "phase": status.get("phase", ""),
        "deleting": bool(meta.get("deletionTimestamp")),
        "finalizers": list(meta.get("finalizers") or []),
    }


class Recorder:
    """Samples the namespace and the run's processes until ``stop`` is set."""

    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        *,
        artifact_root: Path,
        state_dir: Path,
        interval_s: float = 0.5,
        versions_every: int = 4,
    ) -> None:
        self.kube, self.namespace = kube, namespace
        self.artifact_root = artifact_root
        self.serving_root = state_dir / "serving"
        self.training_root = state_dir / "training"
        self.interval_s, self.versions_every = interval_s, versions_every
        self.conditions: list[ConditionSeen] = []
        self.analysis: dict[tuple[str, int, str, str], AnalysisSeen] = {}
        self.rollouts: list[RolloutSeen] = []
        self.weights: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
        self.server_records: dict[str, list[tuple[float, str, dict[str, Any]]]] = defaultdict(list)
        self.processes: dict[tuple[str, str], Processes] = defaultdict(Processes)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.first_seen: dict[tuple[str, str], float] = {}
        self.failed_samples = 0
        self.samples = 0
        self._last_conditions: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._mtimes: dict[Path, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        rounds = 0
        while not stop.is_set():
            kinds = [k for k in KINDS if k != "ModelVersion" or rounds % self.versions_every == 0]
            await self.sample(kinds)
            rounds += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
        await self.sample(list(KINDS))

    async def sample(self, kinds: Iterable[str]) -> None:
        self.samples += 1
        for kind in kinds:
            try:
                items = await self.kube.list(KINDS[kind], self.namespace)
            except Exception:  # the API server may be down: that is the point of the run
                self.failed_samples += 1
                continue
            now = time.time()
            for body in items:
                self._record_object(kind, body, now)
        await asyncio.to_thread(self._sample_files)
        await asyncio.to_thread(self._sample_processes)

    def _record_object(self, kind: str, body: dict[str, Any], now: float) -> None:
        name = body["metadata"]["name"]
        self.objects[(kind, name)] = _summary(kind, body)
        self.first_seen.setdefault((kind, name), now)
        status = body.get("status") or {}
        for cond in status.get("conditions") or []:
            key = (kind, name, str(cond.get("type")))
            value = (str(cond.get("status")), str(cond.get("reason")))
            if self._last_conditions.get(key) != value:
                self._last_conditions[key] = value
                self.conditions.append(
                    ConditionSeen(
                        now, kind, name, key[2], value[0], value[1], str(cond.get("message"))[:300]
                    )
                )
        if kind == "ModelDeployment":
            self._record_rollout(name, status, now)

    def _record_rollout(self, name: str, status: dict[str, Any], now: float) -> None:
        canary = status.get("canary") or {}
        seen = RolloutSeen(
            now,
            name,
            str(status.get("phase", "")),
            str((status.get("stable") or {}).get("modelVersion") or ""),
            str(canary.get("modelVersion") or ""),
            int(canary.get("weight") or 0),
            int(status.get("currentStep") or 0),
            tuple(
                (str(h.get("toVersion")), str(h.get("result")), str(h.get("finishedAt")))
                for h in status.get("history") or []
            ),
        )
        last = next((r for r in reversed(self.rollouts) if r.deployment == name), None)
        if last is None or (last.phase, last.stable, last.canary, last.weight, last.step) != (
            seen.phase,
            seen.stable,
            seen.canary,
            seen.weight,
            seen.step,
        ):
            self.rollouts.append(seen)
        for record in status.get("analysis") or []:
            key = (name, int(record["step"]), str(record["check"]), str(record.get("time", "")))
            if key not in self.analysis:
                value = record.get("value")
                self.analysis[key] = AnalysisSeen(
                    name,
                    seen.canary,
                    key[1],
                    key[2],
                    str(record["verdict"]),
                    key[3],
                    float(value) if value is not None else None,
                )

    def _changed(self, path: Path) -> bool:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        if self._mtimes.get(path) == mtime:
            return False
        self._mtimes[path] = mtime
        return True

    def _sample_files(self) -> None:
        now = time.time()
        for folder in (self.serving_root / self.namespace).glob("*"):
            weights = folder / "weights.json"
            if self._changed(weights):
                with contextlib.suppress(OSError, ValueError):
                    self.weights[folder.name].append((now, json.loads(weights.read_text())))
            for record in (folder / "servers").glob("*.json"):
                if self._changed(record):
                    with contextlib.suppress(OSError, ValueError):
                        self.server_records[folder.name].append(
                            (now, record.stem, json.loads(record.read_text()))
                        )

    def _sample_processes(self) -> None:
        found = scan_processes(
            artifact_root=self.artifact_root,
            serving_root=self.serving_root,
            training_root=self.training_root,
        )
        for key, procs in self.processes.items():
            procs.alive = found.get(key, set())
        for key, pids in found.items():
            procs = self.processes[key]
            procs.alive = pids
            procs.pids |= pids
            procs.max_alive = max(procs.max_alive, len(pids))

    def conditions_between(self, start: float, end: float) -> list[ConditionSeen]:
        return [c for c in self.conditions if start <= c.t <= end]
