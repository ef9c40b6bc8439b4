"""The chaos run, one code path for ``bench/chaos.py`` (``make chaos``) and
``tests/integration/test_chaos.py`` (smaller numbers):

1. setup: a control plane of its own (purged, started, CRDs), Prometheus, the fault proxy, the
   operator started through the proxy (``operator_process``, as the tests start it);
2. play, over the fault window: the workload (``workload``) while the operator is SIGKILLed at
   seeded moments, the API server and etcd are restarted, the proxy injects 409s on writes and
   silences the watches once, Prometheus is stopped during a canary step and the canary's model
   server is SIGKILLed during another;
3. settle: wait until every object converged (or nothing moved for a while);
4. judge: the invariants (``invariants``) over the objects and what the recorder saw;
5. delete: every TrainingRun, deployment and policy and some versions (the operator is killed
   once meanwhile), then the namespace; what is left is a stuck finalizer;
6. report: counts, what each fault looked like from outside, and the RESULT line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from tests.conftest import ROOT
from tests.integration.conftest import operator_process

from hack import prometheus as prometheus_mod
from hack.chaos import invariants as inv
from hack.chaos import workload
from hack.chaos.faults import ControlPlane, Fault, OperatorSupervisor, PrometheusControl
from hack.chaos.proxy import FaultProxy, Upstream
from hack.chaos.record import KINDS, Recorder, scan_processes
from hack.chaos.relay import TcpRelay
from hack.chaos.world import ChaosConfig, World
from hack.cluster import cluster as cluster_mod
from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.backends.kube import EVENTS, NAMESPACES, KubeClient, NotFound
from kubeloop.backends.serving_local import LocalServingBackend

SCRAPE_INTERVAL = "1s"
RUNNER_STARTED = "[kubeloop] local run of"
# Conditions that say all is well; everything else seen during a fault is reported.
HEALTHY = {("Ready", "True"), ("Degraded", "False"), ("Drifted", "False"), ("GatesPassed", "True")}
OBSERVE_AFTER_S = 30.0  # a fault's effects are looked for until this long after it ended
DELETION_STALL_S = 15.0  # deletion gave up once nothing went for this long (a restart: ~5 s)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the operator the run starts; restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _print(line: str) -> None:
    print(line, flush=True)


async def run_chaos(cfg: ChaosConfig, log: Callable[[str], None] = _print) -> dict[str, Any]:
    """One chaos run; returns its report (``result_line(report)`` is the RESULT line)."""
    world = World(cfg, log)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    report: dict[str, Any] = {}
    started = time.monotonic()
    try:
        trained = await setup(world)
        env = {
            "KUBECONFIG": str(world.cfg.work_dir / "operator-kubeconfig"),
            "KUBELOOP_STATE_DIR": str(world.state_dir),
            "KUBELOOP_EXECUTOR": "local",
            "KUBELOOP_SERVING_BACKEND": "local",
            "KUBELOOP_PROMETHEUS_URL": world.relay.url if world.relay else "",
            "KUBELOOP_SCRAPE_TARGETS_DIR": str(_prom(world).prom.targets_dir),
        }
        with environment(env):
            world.operator = OperatorSupervisor(
                lambda: operator_process(world.namespace, world.artifact_root, world.operator_log),
                world.faults,
            )
            world.started = time.time()
            world.operator.start()
            log(f"chaos: set up in {time.monotonic() - started:.1f}s; the operator starts")
            assert world.recorder is not None
            background += [
                asyncio.create_task(world.recorder.run(stop)),
                asyncio.create_task(world.operator.supervise(stop)),
            ]
            await play(world, trained)
            await settle(world)
            report = await judge(world)
            report["deletion"] = await delete_everything(world)
            report["kills"] = len(world.faults.of("operator-kill"))
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
            report["leaked_processes"] = leaked(world)
    finally:
        stop.set()
        for task in background:
            task.cancel()
        await teardown(world)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["result"] = result_line(report)
    return report


def _prom(world: World) -> PrometheusControl:
    assert world.prometheus is not None
    return world.prometheus


async def setup(world: World) -> asyncio.Task[dict[str, Any]] | None:
    cfg, log = world.cfg, world.log
    # The models train while the control plane starts (both take a few seconds).
    models = asyncio.create_task(
        asyncio.to_thread(workload.train_churn_models, world.models_dir / "churn")
    )
    trained = None
    if cfg.drift_loop:
        trained = asyncio.create_task(workload.train_payments(world.models_dir / "payments"))
    await asyncio.to_thread(cluster_mod.down, cfg.cluster_dir, purge=True)
    cluster = await asyncio.to_thread(cluster_mod.up, cfg.cluster_dir)
    await asyncio.to_thread(cluster_mod.install_crds, cluster, ROOT / "crds")
    world.cluster = cluster
    world.control_plane = ControlPlane(cfg.cluster_dir, world.faults)
    prom = await asyncio.to_thread(
        prometheus_mod.up,
        cfg.work_dir / "prometheus",
        targets_dir=cfg.work_dir / "targets",
        scrape_interval=SCRAPE_INTERVAL,
    )
    world.prometheus = PrometheusControl(prom, SCRAPE_INTERVAL, world.faults)
    # The operator reads Prometheus through a fixed address, as through a Service.
    world.relay = TcpRelay(lambda: _prom(world).prom.port).start()
    world.proxy = FaultProxy(
        Upstream.of_local_cluster(cluster.server, cfg.cluster_dir),
        cfg.work_dir / "proxy-tls",
        seed=cfg.seed,
        conflict_rate=cfg.conflict_rate,
    ).start()
    world.proxy.write_kubeconfig(cfg.work_dir / "operator-kubeconfig")
    world.kube = KubeClient(world.admin_connection(cluster), field_manager="kubeloop-chaos")
    await world.kube.create(
        NAMESPACES,
        None,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": world.namespace}},
    )
    world.recorder = Recorder(
        world.kube, world.namespace, artifact_root=world.artifact_root, state_dir=world.state_dir
    )
    churn = await models
    if cfg.canaries:
        await workload.register_churn(world, churn)
    log(f"chaos: namespace {world.namespace}, API server {cluster.server}, via {world.proxy.url}")
    return trained


async def play(world: World, trained: asyncio.Task[dict[str, Any]] | None) -> None:
    """The workload and the fault schedule, together."""
    cfg = world.cfg
    fixed = (
        (cfg.training_runs + 1 + cfg.canaries + 3 * bool(cfg.canaries) + cfg.notify_policies)
        + (4 if cfg.drift_loop else 0)
        + int(cfg.probe_conflict)
    )
    waves = workload.VersionWaves(world, max(0, cfg.objects - fixed))
    tasks = [
        workload.version_waves(world, waves),
        workload.trainings(world),
        faults(world),
    ]
    for i in range(cfg.canaries):
        last = i == cfg.canaries - 1
        tasks.append(workload.canary(world, i, outage=i == 0, kill_server=last))
    if cfg.canaries:
        tasks += [workload.notify_policy(world, i) for i in range(cfg.notify_policies)]
    if trained is not None:
        tasks.append(workload.drift_loop(world, trained))
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, BaseException):  # judged like the rest: it shows as unsettled
            world.notes.setdefault("workload_errors", []).append(f"{result!r}"[:500])
            world.log(f"  {world.elapsed():6.1f}s workload error: {result!r}"[:300])
    await asyncio.to_thread(waves.write_late)
    if cfg.probe_conflict:
        await workload.probe(world)
    await workload.registered_children(world)


async def faults(world: World) -> None:
    """Operator kills, API-server and etcd restarts at seeded moments of the fault window."""
    cfg = world.cfg
    window = cfg.fault_window_s
    # No kill while the watches are silent: the silence is the fault there (a kill would
    # replace the silent streams by fresh ones).
    silent_at = (cfg.waves // 2) * window / cfg.waves
    quiet = [(silent_at - cfg.kill_gap_s, silent_at + cfg.silence_s + 4)] if cfg.silence_s else []
    kills = world.schedule(cfg.kills, start=5.0, end=window, gap=cfg.kill_gap_s, avoid=quiet)
    quiet_restart = [(a - cfg.restart_down_s - 10, b) for a, b in quiet]
    restarts = [("kube-apiserver", t) for t in world.schedule(
        cfg.api_restarts, start=0.2 * window, end=0.8 * window, gap=30, avoid=quiet_restart
    )] + [("etcd", t) for t in world.schedule(
        cfg.etcd_restarts, start=0.3 * window, end=0.9 * window, gap=30, avoid=quiet_restart
    )]  # fmt: skip

    async def kill_at(t: float, n: int) -> None:
        await world.at(t)
        assert world.operator is not None
        await world.operator.kill(f"kill {n + 1} at {t:.1f}s")
        world.log(f"  {world.elapsed():6.1f}s SIGKILL operator ({n + 1}/{len(kills)})")

    async def restart_at(component: str, t: float) -> None:
        await world.at(t)
        assert world.control_plane is not None
        world.log(f"  {world.elapsed():6.1f}s restarting {component}")
        fault = await world.control_plane.restart(component, down_s=cfg.restart_down_s)
        world.log(f"  {world.elapsed():6.1f}s {component} back ({fault.end - fault.start:.1f}s)")

    await asyncio.gather(
        *(kill_at(t, n) for n, t in enumerate(kills)),
        *(restart_at(c, t) for c, t in restarts),
    )


async def current(world: World) -> dict[tuple[str, str], dict[str, Any]]:
    bodies: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in KINDS:
        for body in await world.items(kind):
            body.setdefault("kind", kind)
            bodies[(kind, body["metadata"]["name"])] = body
    return bodies


async def wait_for_progress(
    probe: Callable[[], Awaitable[tuple[frozenset[str], float]]], *, within: float
) -> frozenset[str]:
    """Poll ``probe`` (what is still pending, and how long it may stay unchanged) until
    nothing is pending, it did not change for that long, or ``within`` passed."""
    deadline = time.monotonic() + within
    last: frozenset[str] | None = None
    since = time.monotonic()
    while True:
        pending, stall_s = await probe()
        if not pending:
            return pending
        if pending != last:
            last, since = pending, time.monotonic()
        if time.monotonic() - since > stall_s or time.monotonic() > deadline:
            return pending
        await asyncio.sleep(1)


async def settle(world: World) -> None:
    """Wait until every object converged, for at most ``settle_s``, or until the unsettled
    ones stayed so for ``stall_s``."""
    cfg = world.cfg

    async def unsettled() -> tuple[frozenset[str], float]:
        result = inv.convergence(world.expected.values(), await current(world))
        return frozenset(result.unsettled), cfg.scaled(cfg.stall_s)

    await wait_for_progress(unsettled, within=cfg.scaled(cfg.settle_s))
    world.log(f"  {world.elapsed():6.1f}s settled")


async def prometheus_samples(url: str, selector: str) -> list[list[tuple[float, float]]]:
    """Every raw sample of the series ``selector`` names (one list per series)."""
    query = urllib.parse.urlencode({"query": f"{selector}[3h]"})
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client,
        client.get(f"{url}/api/v1/query?{query}") as resp,
    ):
        body = await resp.json()
    return [
        [(float(t), float(v)) for t, v in series["values"]]
        for series in body.get("data", {}).get("result", [])
    ]


def runner_starts(world: World) -> dict[str, int]:
    """How many times a pipeline runner started in each attempt directory (its log says)."""
    starts = {}
    for log in (world.state_dir / "training" / world.namespace).glob("*/attempt-*/run.log"):
        text = log.read_text(errors="replace")
        starts[str(log.parent.relative_to(world.state_dir))] = text.count(RUNNER_STARTED)
    return starts


def alias_holders(versions: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Aliases that more than one Ready version of a model holds (its status, the registry's
    word): "model:alias" → names. (A version refused by policy keeps its claim in the spec but
    never holds it.)"""
    holders: dict[str, list[str]] = {}
    for mv in versions:
        ready = inv.judge(inv.Expected("ModelVersion", "", True), mv)[0] == "converged"
        for alias in (mv.get("status") or {}).get("aliases") or [] if ready else []:
            holders.setdefault(f"{mv['spec']['modelName']}:{alias}", []).append(
                mv["metadata"]["name"]
            )
    return {k: sorted(v) for k, v in holders.items() if len(v) > 1}


async def judge(world: World) -> dict[str, Any]:
    """The invariants over the settled world and what the recorder saw."""
    assert world.recorder is not None
    assert world.proxy is not None
    bodies = await current(world)
    of = {kind: [b for (k, _), b in bodies.items() if k == kind] for kind in KINDS}
    converged = inv.convergence(world.expected.values(), bodies)
    assert world.operator is not None
    # For a diagnosis: whether what did not converge had a write refused with a 409 during the
    # operator's last life (kopf alone drops such a write: handlers/kopf_patching.py).
    victims = inv.refused_after(world.proxy.stats().refused, max(world.operator.started_at))
    refused_write, otherwise = inv.explained(converged.unsettled, victims)
    prom = _prom(world)
    outages = [(f.start, f.end) for f in world.faults.of("prometheus")]
    analysis = list(world.recorder.analysis.values())
    promotions = [
        (name, h["toVersion"], h.get("finishedAt", ""))
        for md in of["ModelDeployment"]
        for name in [md["metadata"]["name"]]
        for h in (md.get("status") or {}).get("history") or []
        if h.get("result") == "Promoted"
    ]
    traffic: dict[str, Any] = {}
    for rb in world.rollbacks:
        series = await prometheus_samples(
            prom.prom.url,
            f'kubeloop_requests_total{{namespace="{world.namespace}",model="{rb.deployment}",'
            f'version="{rb.version}"}}',
        )
        traffic[f"{rb.deployment}/{rb.version}"] = {
            "requests_before": sum(s[-1][1] for s in series if s and s[-1][0] <= rb.at),
            "requests_after": sum(inv.served_after(s, rb.at) for s in series),
            "weights_after": inv.weights_after_rollback(rb, world.recorder.weights[rb.deployment]),
        }
    duplicates = {
        "versions_per_attempt": inv.duplicate_registrations(of["ModelVersion"]),
        "runner_starts_per_attempt": inv.duplicate_runner_starts(runner_starts(world)),
        "instances_at_once": inv.duplicate_instances(world.recorder.processes),
        "retrains_per_breach": inv.duplicate_retrains(of["TrainingRun"], of["DriftPolicy"]),
        # A recorded retrain that never existed: its breach was retrained a second time.
        "phantom_retrains": inv.phantom_retrains(
            of["DriftPolicy"], [n for k, n in world.recorder.first_seen if k == "TrainingRun"]
        ),
    }
    events = await _events(world)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(world.cfg).items()},
        "namespace": world.namespace,
        "objects": len(world.expected),
        "objects_by_kind": dict(Counter(k for k, _ in world.expected)),
        "kills": len(world.faults.of("operator-kill")),
        "converged": converged.converged,
        "lost": converged.lost,
        "wrong": converged.wrong,
        "unsettled_after_a_refused_write": refused_write,
        "unsettled_otherwise": otherwise,
        "duplicates": duplicates,
        "alias_holders": alias_holders(of["ModelVersion"]),
        "traffic_after_rollback": traffic,
        "promoted_without_data": inv.promoted_without_data(
            world.recorder.analysis.values(), promotions, outages
        ),
        "verdicts_during_outages": dict(
            Counter(r.verdict for r in inv.during_outages(analysis, outages))
        ),
        "passes_during_outages": [
            vars(r) for r in inv.passes_during_outages(world.recorder.analysis.values(), outages)
        ],
        "faults": [f.as_dict() for f in world.faults.faults],
        "observed": observed(world, events),
        "proxy": world.proxy.stats().as_dict(),
        "prometheus_relay_refused": world.relay.refused if world.relay else 0,
        "operator": operator_health(world),
        "recorder": {"samples": world.recorder.samples, "failed": world.recorder.failed_samples},
        "silence": silence_catch_up(world),
        "rollouts": [
            [round(r.t - world.started, 1), r.deployment, r.phase, r.stable, r.canary, r.weight]
            for r in world.recorder.rollouts
        ],
        "workload_errors": world.notes.get("workload_errors", []),
        # HTTP status → requests, as the clients of each deployment saw them (0: no answer).
        "client_traffic": {
            name: {str(code): n for code, n in sorted(codes.items())}
            for name, codes in world.notes.get("client_traffic", {}).items()
        },
        "statuses": {
            f"{kind}/{name}": body.get("status") or {}
            for (kind, name), body in bodies.items()
            if kind != "ModelVersion" or f"{kind}/{name}" in str(converged.unsettled)
        },
    }


async def _events(world: World) -> list[dict[str, Any]]:
    found = await world.persist(lambda: world.api.list(EVENTS, world.namespace), "events")
    return list(found or [])


def _event_time(event: dict[str, Any]) -> float:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        stamp = inv._stamp(str(event.get(key) or ""))
        if stamp is not None:
            return stamp
    return inv._stamp(str(event["metadata"].get("creationTimestamp", ""))) or 0.0


def observed(world: World, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each fault looked like from outside: the conditions (other than healthy ones) and
    the Events seen from its start until shortly after it ended."""
    assert world.recorder is not None
    designed = {e.key: e.reason for e in world.expected.values() if e.ready is False}
    seen = []
    for fault in world.faults.faults:
        if fault.kind == "operator-kill":
            continue
        end = (fault.end or fault.start) + OBSERVE_AFTER_S
        conditions = Counter(
            f"{c.kind} {c.type}={c.reason}({c.status})"
            for c in world.recorder.conditions_between(fault.start, end)
            if (c.type, c.status) not in HEALTHY
            and c.type != "Progressing"
            and c.status != "Unknown"  # not evaluated yet
            and c.reason != designed.get((c.kind, c.name))  # the failure it was made for
        )
        reasons = Counter(
            f"{e.get('type')} {e.get('reason')}"
            for e in events
            if fault.start <= _event_time(e) <= end and e.get("reason")
        )
        seen.append(
            {
                **fault.as_dict(),
                "conditions": dict(conditions.most_common()),
                "events": dict(reasons.most_common(12)),
            }
        )
    return seen


def operator_health(world: World) -> dict[str, Any]:
    """Starts, crashes (exits nobody caused) and what the operator's log complains about."""
    assert world.operator is not None
    text = world.operator_log.read_text(errors="replace") if world.operator_log.exists() else ""
    patterns = {
        "tracebacks": r"^Traceback",
        "kopf_throttling": r"Throttling for \d+ seconds due to an unexpected error",
        "kopf_unrecoverable": r"unrecoverable error",
        "daemon_pass_errors": r"pass failed \(retry in",
        "request_retries": r"Request attempt #\d+/\d+ failed; will retry",
    }
    return {
        "starts": world.operator.starts,
        "crashes": world.operator.crashes,
        **{k: len(re.findall(p, text, flags=re.MULTILINE)) for k, p in patterns.items()},
    }


def silence_catch_up(world: World) -> dict[str, Any]:
    """The wave created while the watches were silent: reconciled during the silence (by an
    operator restarted meanwhile, whose fresh list sees them), and how long after it ended the
    last of them was first seen with a status."""
    assert world.recorder is not None
    names = set(world.notes.get("silent_wave", []))
    silences = world.faults.of("silence")
    if not names or not silences:
        return {}
    start, end = silences[0].start, silences[0].end
    first: dict[str, float] = {}
    for c in world.recorder.conditions:
        if c.kind == "ModelVersion" and c.name in names and c.type == "Ready":
            first.setdefault(c.name, c.t)
    during = sum(1 for t in first.values() if t < end)
    return {
        "versions": len(names),
        "reconciled_during_silence": during,
        "kills_during_silence": sum(
            1 for f in world.faults.of("operator-kill") if start <= f.start <= end
        ),
        "last_reconciled_after_end_s": round(max(first.values(), default=end) - end, 1),
        "never_reconciled": len(names - set(first)),
    }


async def delete_everything(world: World) -> dict[str, Any]:
    """Delete the TrainingRuns, deployments, policies and a tenth of the versions (the
    operator killed once meanwhile); then the namespace. What stays is stuck."""
    cfg = world.cfg
    bodies = await current(world)
    targets = [key for key in bodies if key[0] != "ModelVersion"]
    versions = sorted(k for k in bodies if k[0] == "ModelVersion")
    targets += world.rng.sample(versions, k=len(versions) // 10)
    if cfg.probe_conflict and world.proxy is not None and ("ModelDeployment", "churn-0") in bodies:
        # The write that removes the deployment's finalizer is refused once (see probe()).
        world.proxy.refuse_first("/modeldeployments/churn-0", body_fragment="finalizers")
    started = time.time()
    for kind, name in targets:
        await world.delete(kind, name)
    assert world.operator is not None
    await asyncio.sleep(world.rng.uniform(0.5, 3.0))
    await world.operator.kill("during deletion")

    stall_s = cfg.scaled(DELETION_STALL_S)

    async def not_gone() -> tuple[frozenset[str], float]:
        now = await current(world)
        return frozenset(f"{k}/{n}" for k, n in targets if (k, n) in now), stall_s

    await wait_for_progress(not_gone, within=cfg.scaled(cfg.delete_within_s))
    left = await current(world)
    stuck = inv.stuck_finalizers([left[k] for k in targets if k in left])
    assert world.proxy is not None
    victims = inv.refused_after(world.proxy.stats().refused, max(world.operator.started_at))
    stuck_refused, stuck_otherwise = inv.explained(stuck, victims)
    deleted_in = time.time() - started

    await world.persist(
        lambda: world.api.delete(NAMESPACES, None, world.namespace), "delete the namespace"
    )

    async def namespace_left() -> tuple[frozenset[str], float]:
        try:
            await world.api.get(NAMESPACES, None, world.namespace)
        except NotFound:
            return frozenset(), stall_s
        except Exception:  # the API server may be slow to answer: still there
            pass
        now = await current(world)
        return frozenset({"namespace", *(f"{k}/{n}" for k, n in now)}), stall_s

    left_over = await wait_for_progress(namespace_left, within=cfg.scaled(cfg.delete_within_s))
    namespace_deleted = not left_over
    remaining: list[str] = []
    if not namespace_deleted:
        remaining = [f"{k}/{n}: {b['metadata'].get('finalizers')}" for (k, n), b in
                     (await current(world)).items()]  # fmt: skip
    return {
        "deleted": len(targets),
        "objects_deleted_s": round(deleted_in, 1),
        "stuck_finalizers": stuck,
        "stuck_after_a_refused_write": stuck_refused,
        "stuck_otherwise": stuck_otherwise,
        "namespace_deleted": namespace_deleted,
        "namespace_deleted_s": round(time.time() - started - deleted_in, 1),
        "left_in_namespace": remaining[:50],
    }


def leaked(world: World) -> list[str]:
    """Servers, routers and runners of the run still alive after the namespace was deleted."""
    found = scan_processes(
        artifact_root=world.artifact_root,
        serving_root=world.state_dir / "serving",
        training_root=world.state_dir / "training",
    )
    return sorted(f"{role} {key}" for (role, key), pids in found.items() if pids)


def keep_diagnostics(world: World) -> None:
    """The serving backend's records and logs, kept beside the report (stop_all removes them)."""
    source = world.state_dir / "serving"
    if source.exists():
        shutil.copytree(source, world.cfg.work_dir / "diagnostics" / "serving", dirs_exist_ok=True)


async def teardown(world: World) -> None:
    cfg = world.cfg
    await asyncio.to_thread(keep_diagnostics, world)
    if world.operator is not None:
        await asyncio.to_thread(world.operator.stop)
    if world.proxy is not None:
        world.proxy.stop()
    if world.relay is not None:
        world.relay.stop()
    targets = cfg.work_dir / "targets"
    await asyncio.to_thread(LocalServingBackend(world.state_dir, targets).stop_all)
    await asyncio.to_thread(LocalExecutor(world.state_dir).stop_all)
    await asyncio.to_thread(LocalExecutor(world.models_dir / "payments" / "state").stop_all)
    if world.kube is not None:
        await world.kube.close()
    await asyncio.to_thread(prometheus_mod.down, cfg.work_dir / "prometheus")
    await asyncio.to_thread(cluster_mod.down, cfg.cluster_dir, purge=True)


def counts(report: dict[str, Any]) -> dict[str, int]:
    """The numbers the RESULT line and the test's assertions read."""
    dup = report.get("duplicates", {})
    deletion = report.get("deletion", {})
    traffic = report.get("traffic_after_rollback", {})
    return {
        "objects": int(report.get("objects", 0)),
        "kills": int(report.get("kills", 0)),
        "converged": int(report.get("converged", 0)),
        "lost": len(report.get("lost", [])),
        "wrong": len(report.get("wrong", [])),
        "duplicates": sum(_dup(table, v) for table, v in dup.items()),
        "stuck_finalizers": len(deletion.get("stuck_finalizers", [])),
        "promoted_without_data": len(report.get("promoted_without_data", [])),
        "traffic_after_rollback": int(
            sum(t["requests_after"] + t["weights_after"] for t in traffic.values())
        ),
        "alias_conflicts": len(report.get("alias_holders", {})),
        "namespace_deleted": int(bool(deletion.get("namespace_deleted"))),
        "leaked_processes": len(report.get("leaked_processes", [])),
        "operator_crashes": len(report.get("operator", {}).get("crashes", [])),
    }


def _dup(table: str, found: dict[str, Any]) -> int:
    """Extra children in one duplicates table: a list of names holds one too many (a phantom
    retrain: each one); a count of instances n, n - 1; of extra retrains, n."""
    if table == "phantom_retrains":
        return sum(len(v) for v in found.values())
    if table == "retrains_per_breach":
        return sum(int(v) for v in found.values())
    return sum(len(v) - 1 if isinstance(v, list) else int(v) - 1 for v in found.values())


def result_line(report: dict[str, Any]) -> str:
    c = counts(report)
    head = ("objects", "kills", "converged", "lost", "duplicates", "stuck_finalizers",
            "promoted_without_data")  # fmt: skip
    tail = [k for k in c if k not in head]
    return (
        "RESULT "
        + " ".join(f"{k}={c[k]}" for k in (*head, *tail))
        + (f" seconds={report.get('seconds', 0)}")
    )


def save(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


__all__ = ["ChaosConfig", "Fault", "counts", "result_line", "run_chaos", "save"]
